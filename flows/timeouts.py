"""Per-site timeouts learned from each site's own history.

Plain Python. With `pipeline.learned_timeout` set, a site whose last `window` successful
attempts number at least `min_runs` gets `min(timeout, max(floor, factor x p95))` seconds
per attempt; any other site gets `pipeline.timeout`, which stays the hard cap. The durations
come from earlier runs' summaries (`flows.engine.baselines.success_durations`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flows.config import LearnedTimeout


@dataclass(frozen=True)
class SiteTimeout:
    """An attempt's timeout and where the number came from (for the task run's log)."""

    seconds: float
    why: str


def p95(values: Sequence[float]) -> float:
    """The 95th percentile by nearest rank: the smallest value with at least 95 % of the
    values at or below it. Raises ValueError for no values."""
    if not values:
        raise ValueError("p95 of no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def site_timeout(
    durations: Sequence[float], learned: LearnedTimeout | None, timeout: float
) -> SiteTimeout:
    """The timeout for one site from its recent successful durations (oldest first)."""
    if learned is None:
        return SiteTimeout(timeout, f"timeout {timeout:g} s (pipeline.timeout)")
    recent = list(durations)[-learned.window :]
    if len(recent) < learned.min_runs:
        return SiteTimeout(
            timeout,
            f"timeout {timeout:g} s (pipeline.timeout: {len(recent)} successful runs on "
            f"record, learned_timeout needs {learned.min_runs})",
        )
    high = p95(recent)
    wanted = learned.factor * high
    seconds = min(timeout, max(learned.floor, wanted))
    why = f"timeout {seconds:g} s ({learned.factor:g} x p95 {high:g} s over {len(recent)} runs"
    if seconds == timeout and wanted > timeout:
        why += f", capped by pipeline.timeout {timeout:g} s"
    elif seconds == learned.floor and wanted < learned.floor:
        why += f", raised to floor {learned.floor:g} s"
    return SiteTimeout(seconds, why + ")")


def site_timeouts(
    sites: Sequence[str],
    history: Mapping[str, Sequence[float]],
    learned: LearnedTimeout | None,
    timeout: float,
) -> dict[str, SiteTimeout]:
    """Every site's timeout."""
    return {site: site_timeout(history.get(site, ()), learned, timeout) for site in sites}
