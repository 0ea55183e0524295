"""A run's metrics as figures (`pipeline.metrics`): every site's last values and the run's,
built from the run's summary and the previous values (`build`, a `Snapshot`).

Plain Python, no Prefect and no prometheus_client. What each figure is, and which sites a
run changes: `flows.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

SITE_STATUSES = ("succeeded", "failed", "timed_out", "cancelled")
RUN_STATUSES = ("succeeded", "failed", "timed_out", "cancelled", "skipped")
_FAILED = frozenset({"failed", "timed_out"})
MB = 2**20


@dataclass(frozen=True)
class SiteValues:
    """One site's exported values."""

    group: str
    last_run: float
    first_run: float
    status: str
    duration: float
    attempts: int
    streak: int
    last_success: float | None = None
    peak_rss_bytes: float | None = None
    cpu: float | None = None
    check: tuple[str, float] | None = None  # (field, value)


@dataclass(frozen=True)
class RunValues:
    """The last run's values."""

    sites: Mapping[str, int]  # by status, every RUN_STATUSES key
    end: float
    duration: float | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything exported: each site's values (in order) and the last run's."""

    sites: Mapping[str, SiteValues]
    run: RunValues


def ran(row: Mapping[str, Any]) -> bool:
    """Whether the summary row's site ran in its run (see the module's doc)."""
    status = row["status"]
    return status != "skipped" and not (status == "cancelled" and not row.get("attempts"))


def next_streak(previous: int, status: str) -> int:
    if status in _FAILED:
        return previous + 1
    return 0 if status == "succeeded" else previous


def _check_value(row: Mapping[str, Any]) -> tuple[str, float] | None:
    check = row.get("check")
    if not isinstance(check, Mapping):
        return None
    value = check.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return str(check.get("field")), float(value)


def build(
    summary: Mapping[str, Any],
    previous: Mapping[str, SiteValues],
    *,
    ended: float,
    duration: float | None = None,
    groups: Mapping[str, str] | None = None,
    configured: Collection[str] | None = None,
    streaks: Mapping[str, int] | None = None,
) -> Snapshot:
    """The snapshot after a run. `summary`: the run's (`flows.report.build_summary`);
    `previous`: the values read from the state file; `ended`: the run's end (Unix time);
    `groups`: each grouped site's group; `configured`: the config's own site list, None
    when unknown (no site is removed); `streaks`: failure streaks from the run history
    (this run included), where known: the larger of it and the previous value's is kept."""
    groups = groups or {}
    streaks = streaks or {}
    rows = summary["sites"]
    this_run = {row["site"]: row for row in rows if ran(row)}
    sites: dict[str, SiteValues] = {}
    for row in rows:
        site = row["site"]
        before = previous.get(site)
        if site not in this_run:
            if before is not None:
                sites[site] = before
            continue
        status = row["status"]
        streak = next_streak(before.streak if before else 0, status)
        if status != "cancelled":
            streak = max(streak, streaks.get(site, 0))
        rss = row.get("peak_rss_mb")
        cpu = row.get("cpu_s")
        sites[site] = SiteValues(
            group=groups.get(site, ""),
            last_run=ended,
            first_run=before.first_run if before else ended,
            status=status,
            duration=float(row.get("duration_s") or 0.0),
            attempts=int(row.get("attempts") or 0),
            streak=streak,
            last_success=ended if status == "succeeded" else _last_success(before),
            peak_rss_bytes=None if rss is None else round(float(rss) * MB),
            cpu=None if cpu is None else float(cpu),
            check=_check_value(row),
        )
    for site, values in previous.items():
        if site not in sites and (configured is None or site in configured):
            sites[site] = values
    tally = dict.fromkeys(RUN_STATUSES, 0)
    for row in rows:
        tally[row["status"]] = tally.get(row["status"], 0) + 1
    return Snapshot(sites, RunValues(tally, ended, duration))


def _last_success(before: SiteValues | None) -> float | None:
    return before.last_success if before is not None else None
