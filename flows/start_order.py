"""In which order a run starts its sites: priority, then history, then the list.

Plain Python. A night ends when its last site ends, so a long site listed last makes the
night about as long as that site longer than it has to be. The recorded summaries already
say which sites are long (the learned timeouts read them), so by default
(`order: longest_first`) the sites start:

1. by `priority`, higher first (a site's own setting, default 0), before either rule;
2. sites with no recorded success first, in list order: an unknown site may be long;
3. then the known sites, longest expected duration first (the median of its recent
   successful durations; one earlier success is enough), ties in list order.

`order: listed` keeps list order after the priority; the old one-at-a-time loop
(`use_async: false`) keeps list order, priorities and all. Retries of started sites still go
before new sites: that is the slot pool's rule (`flows.slots.hand_out_rule`), given this order.

Group caps (`groups`) add one rule, `spread_groups`: slots are handed out in this order, and
the task runner takes the sites into its threads in it, where a site of a full group waits.
So in any `window` (the global cap) consecutive sites, a group has at most its cap, as far as
other sites allow: a group's next site moves back behind sites that can run, never ahead of
its own group, and comes up just when its group has room again.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from flows.config import RunPlan

OrderMode = Literal["longest_first", "listed", "sequential"]


@dataclass(frozen=True)
class StartOrder:
    """The sites in start order, and the one line the run logs about it."""

    sites: tuple[str, ...]
    line: str


def expected_durations(durations: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Each site's expected duration: the median of its recent successful durations; a site
    with none has no expectation."""
    return {site: statistics.median(values) for site, values in durations.items() if values}


def start_order(
    sites: Sequence[str],
    expected: Mapping[str, float] | None,
    priority: Mapping[str, int],
    mode: OrderMode,
) -> StartOrder:
    """`sites` (in list order) in the order they start, by the module's rules. `expected`
    None: the history was not read (the line says nothing of it; the caller says why)."""
    if mode == "sequential":
        return StartOrder(tuple(sites), "order: as listed (one site at a time)")
    position = {site: index for index, site in enumerate(sites)}

    known_durations = expected or {}

    def key(site: str) -> tuple[int, int, float, int]:
        rank = -priority.get(site, 0)
        if mode == "listed" or site not in known_durations:
            return (rank, 0, 0.0, position[site])
        return (rank, 1, -known_durations[site], position[site])

    ordered = tuple(sorted(sites, key=key))
    prioritised = sum(1 for site in sites if priority.get(site, 0) != 0)
    by_priority = f"; {prioritised} by priority first" if prioritised else ""
    if mode == "listed":
        return StartOrder(ordered, f"order: as listed{by_priority}")
    if expected is None:
        return StartOrder(ordered, f"order: longest expected first{by_priority}")
    known = sum(1 for site in sites if site in expected)
    if known == 0:
        history = "no site has history yet, so as listed"
    elif known == len(sites):
        history = f"all {known} sites have history"
    else:
        history = (
            f"{known} of {len(sites)} sites have history; "
            f"the {len(sites) - known} without start first"
        )
    return StartOrder(ordered, f"order: longest expected first ({history}){by_priority}")


def spread_groups(
    sites: Sequence[str], group_of: Mapping[str, str], caps: Mapping[str, int], window: int
) -> tuple[str, ...]:
    """`sites` (in start order) with each group's sites moved back so that no `window`
    consecutive sites hold more of one group than its cap, where other sites can fill in.
    Sites outside groups, and each group's own sites, keep their relative order."""
    if not group_of or window <= 1:
        return tuple(sites)
    pending = list(sites)
    placed: list[str] = []
    recent: dict[str, int] = {}  # group -> its sites among the last `window - 1` placed
    while pending:
        pick = 0
        for index, site in enumerate(pending):
            group = group_of.get(site)
            if group is None or recent.get(group, 0) < caps.get(group, window):
                pick = index
                break
        site = pending.pop(pick)
        placed.append(site)
        _count(recent, group_of.get(site), +1)
        if len(placed) >= window:
            _count(recent, group_of.get(placed[-window]), -1)
    return tuple(placed)


def _count(recent: dict[str, int], group: str | None, change: int) -> None:
    if group is not None:
        recent[group] = recent.get(group, 0) + change


HISTORY_WINDOW = 20  # the successes an expected duration is the median of, without learned


def history_window(plan: RunPlan) -> int:
    """How many of a site's last successes its expected duration is the median of: the
    learned timeout's `window` when it is on, else `HISTORY_WINDOW`. The run and `validate`
    both ask this, so `validate` prints the order the run will use."""
    learned = plan.config.learned_timeout
    return learned.window if learned else HISTORY_WINDOW


def order_mode(plan: RunPlan) -> OrderMode:
    """The rule a run of `plan` starts its sites by: its `order`, or the old loop's list
    order when `use_async` is off. Only `longest_first` reads the history."""
    return plan.config.order if plan.use_async else "sequential"


def plan_order(plan: RunPlan, durations: Mapping[str, Sequence[float]] | None) -> StartOrder:
    """A run's start order: `plan`'s sites by priority, history (`durations`: each site's
    recent successful durations; None: not read) and list, as its `order` and `use_async`
    say; then each group's sites spread (`spread_groups`, the window the global cap) so that
    no cap's worth of consecutive sites holds more of a group than its cap: the slots are
    handed out in this order, and the task runner's threads don't fill with sites of a full
    group."""
    mode = order_mode(plan)
    priority = {site: plan.site(site).priority for site in plan.sites}
    expected = None if durations is None else expected_durations(durations)
    order = start_order(plan.sites, expected, priority, mode)
    group_of = plan.site_groups
    if not group_of or not plan.use_async:
        return order
    spread = spread_groups(order.sites, group_of, plan.group_limits, plan.max_concurrent_sites)
    return StartOrder(spread, order.line)
