"""The heterogeneous night and the group-cap row of `bench/cap.py` (issue 21): the workloads,
their bounds, and what the timelines must show. Plain Python; `cap.py` runs them.

The night: 40 sites whose durations are log-normal (sigma 1.2, seed 11), scaled so that the
lower bound at cap C = 8,

    lower bound = max(sum of durations / C, longest site),

is 60 s. No order can end sooner. The sites are listed in the order they were drawn, which is
a random shuffle: the longest site is the 16th of 40. Seed 11 is typical, not chosen to look
good: its list order simulates to 1.19x the bound, the median over seeds 0-199. Longest
first simulates to 1.00x (`simulate`: greedy list scheduling, with no overhead).

The group row: 20 sites of T seconds each under a global cap of 4. Group `hosta` (5 sites)
and group `hostb` (5 sites) have a cap of 1 each, and 10 sites belong to no group. The group
sites are listed first, which is where head-of-line blocking would show: a group site that
waits for its group slot while holding a global slot starves the other sites. The ideal for
these constraints is

    ideal = max(sum / C, max over groups g of sum_g / cap_g, longest site) = 5 T,

and list order can reach it. In each step one `hosta` site, one `hostb` site and two
ungrouped sites run. Efficiency is ideal / span, and the target is at least 0.9. The timeline
must also show that no more than each group's cap of its sites, and no more than the global
cap of all sites, were running at any moment. A site's group is in its name.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping, Sequence

from tests.support.timeline import Row, max_overlap

SEED = 11
SIGMA = 1.2
NIGHT_SITES = 40
NIGHT_CAP = 8
NIGHT_BOUND_S = 60.0

GROUP_CAP = 4  # the global cap of the group row
GROUP_T_S = 6.0
GROUPS = {"hosta": 1, "hostb": 1}  # group -> its cap
GROUP_SITES = 5  # in each group
FREE_SITES = 10  # in no group


def night_durations(
    seed: int = SEED,
    n: int = NIGHT_SITES,
    cap: int = NIGHT_CAP,
    bound: float = NIGHT_BOUND_S,
    sigma: float = SIGMA,
) -> dict[str, float]:
    """`night-00` ... in list order (the draw order) -> seconds, log-normal with `sigma`,
    scaled so that `lower_bound(..., cap)` is `bound` (to rounding)."""
    draw = random.Random(seed)  # noqa: S311 - a workload, not a secret
    raw = [draw.lognormvariate(0.0, sigma) for _ in range(n)]
    scale = bound / max(sum(raw) / cap, max(raw))
    return {f"night-{i:02d}": round(x * scale, 3) for i, x in enumerate(raw)}


def lower_bound(durations: Mapping[str, float], cap: int) -> float:
    """No order ends sooner: `max(sum / cap, longest)`."""
    return max(sum(durations.values()) / cap, max(durations.values()))


def simulate(durations: Sequence[float], cap: int) -> float:
    """The span of greedy list scheduling: each duration in turn starts on the slot that frees
    first (no overhead)."""
    slots = [0.0] * cap
    for duration in durations:
        heapq.heappush(slots, heapq.heappop(slots) + duration)
    return max(slots)


def group_of(site: str) -> str | None:
    """The group a group-row site belongs to, from its name (`hosta-03` -> `hosta`)."""
    prefix = site.split("-", 1)[0]
    return prefix if prefix in GROUPS else None


def group_workload(t: float = GROUP_T_S) -> dict[str, float]:
    """The group row's sites in list order (every group's sites first) -> seconds."""
    sites = [f"{group}-{i:02d}" for group in GROUPS for i in range(GROUP_SITES)]
    sites += [f"free-{i:02d}" for i in range(FREE_SITES)]
    return {site: t for site in sites}


def group_config() -> dict[str, dict[str, object]]:
    """The `pipeline.groups` mapping of the group row: each group matches its name prefix."""
    return {group: {"max_concurrent": cap, "match": f"^{group}-"} for group, cap in GROUPS.items()}


def group_ideal(durations: Mapping[str, float], caps: Mapping[str, int], cap: int) -> float:
    """`max(sum / cap, max over groups of sum_g / cap_g, longest)`."""
    per_group = {
        group: sum(d for site, d in durations.items() if group_of(site) == group) / group_cap
        for group, group_cap in caps.items()
    }
    return max(lower_bound(durations, cap), *per_group.values())


def group_peaks(rows: Sequence[Row]) -> dict[str, int]:
    """The most sites of each group running at the same moment (0 for a group that never ran)."""
    return {
        group: max_overlap([row for row in rows if group_of(row[0]) == group]) for group in GROUPS
    }
