"""`site-pipeline history`: the flow's last runs and each site's last status, from the API.

A site's status is its task run's state (`flows.engine.states.site_status`); for a Failed
task run, the status the flow run's summary table gave the site (`failed` or `timed_out`:
the state can't tell them apart). A run still running has no summary yet: its failed sites
show `failed` until it ends.

Each site's streak, how many runs in a row it did not succeed (`flows.health.streak`), is
counted over the last recorded summary tables (`flows.engine.baselines.summary_tables`), the
rows the health artifact and the failure message count from. With `--site`, each run shows
the site's status there and, when it did not succeed, its cause: the summary row's `cause`,
or for a row recorded before causes were, its `error` or last stderr line, and what it used
there: the row's `peak_rss_mb` and `cpu_s` (None, a blank cell, for a row recorded before
they were).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType, TaskRun

from flows import health
from flows.engine.baselines import summary_tables, summary_tables_of
from flows.engine.states import site_status
from flows.names import FLOW_NAME
from flows.ops.queries import latest_runs, task_runs
from flows.ops.server import api_target
from flows.report import plain_table

Reported = Mapping[UUID, Mapping[str, str]]
"""flow run id -> site -> the status its summary table gave the site."""

Recorded = Mapping[UUID, Mapping[str, Mapping[str, Any]]]
"""flow run id -> site -> the site's row of that run's summary table."""

CAUSE_WIDTH = 100
"""A cause longer than this is cut, in the tables (not in `--json`)."""


def history(limit: int = 10, site: str | None = None, scan: int = 5000) -> dict[str, Any]:
    """The last `limit` flow runs and, per site, its last status, last success and streak;
    with `site`, only that site, and each run says its status and cause there."""
    with get_client(sync_client=True) as client:
        flow_runs = latest_runs(client, limit)
        in_runs = task_runs(client, [run.id for run in flow_runs], site, scan) if flow_runs else []
        recent = task_runs(client, None, site, scan)
        shown = [*in_runs, *_newest_per_site(recent)]
        tables = summary_tables_of(  # with a site, every run's: its usage is in its row
            client,
            {run.flow_run_id for run in shown if run.flow_run_id and (site or _failed(run))},
        )
        streaks = health.streaks({run.name for run in recent}, summary_tables(client=client))
    recorded = {
        flow_run_id: {str(row.get("site")): row for row in rows}
        for flow_run_id, rows in tables.items()
    }
    reported = {
        flow_run_id: {name: str(row.get("status")) for name, row in rows.items()}
        for flow_run_id, rows in recorded.items()
    }
    runs = _run_entries(flow_runs, _tally(in_runs, reported), site)
    if site:
        _add_site_outcomes(runs, in_runs, reported, recorded)
    return {
        "api": api_target(),
        "site": site,
        "runs": runs,
        "sites": _site_entries(recent, reported, streaks),
    }


def _failed(task_run: TaskRun) -> bool:
    return task_run.state is not None and task_run.state.type == StateType.FAILED


def _site_status(task_run: TaskRun, reported: Reported) -> str:
    """The site's status in this task run (see the module's docstring)."""
    status = site_status(task_run.state)
    if status == "failed" and task_run.flow_run_id is not None:
        return reported.get(task_run.flow_run_id, {}).get(task_run.name, status)
    return status


def _newest_per_site(task_runs_newest_first: Iterable[TaskRun]) -> list[TaskRun]:
    """Each site's newest task run."""
    newest: dict[str, TaskRun] = {}
    for task_run in task_runs_newest_first:
        newest.setdefault(task_run.name, task_run)
    return list(newest.values())


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _tally(in_runs: Iterable[TaskRun], reported: Reported) -> dict[UUID, dict[str, int]]:
    """Per flow run: how many of its sites succeeded, and how many did not."""
    tally: dict[UUID, dict[str, int]] = {}
    for task_run in in_runs:
        if task_run.flow_run_id is None:
            continue
        counts = tally.setdefault(task_run.flow_run_id, {"succeeded": 0, "failed": 0})
        ok = _site_status(task_run, reported) == "succeeded"
        counts["succeeded" if ok else "failed"] += 1
    return tally


def _run_entries(
    flow_runs: Sequence[FlowRun], tally: Mapping[UUID, Mapping[str, int]], site: str | None
) -> list[dict[str, Any]]:
    """The `runs` of `history`: with a `site`, only the runs that ran it."""
    runs = []
    for run in flow_runs:
        if site and run.id not in tally:
            continue
        counts = tally.get(run.id, {"succeeded": 0, "failed": 0})
        end = run.end_time
        duration = (end - run.start_time).total_seconds() if end and run.start_time else None
        runs.append(
            {
                "flow_run_id": str(run.id),
                "name": run.name,
                "start_time": _iso(run.start_time),
                "state": run.state.name if run.state else None,
                "duration_s": round(duration, 3) if duration is not None else None,
                "succeeded": counts["succeeded"],
                "failed": counts["failed"],
            }
        )
    return runs


def _add_site_outcomes(
    runs: list[dict[str, Any]], in_runs: Iterable[TaskRun], reported: Reported, recorded: Recorded
) -> None:
    """With `--site`: each run entry gains `site_status`, the site's status in that run,
    `cause`, why it did not succeed there (None when it succeeded or nothing says why), and
    `peak_rss_mb` and `cpu_s`, what it used there (None where the row has none)."""
    by_run = {task_run.flow_run_id: task_run for task_run in in_runs if task_run.flow_run_id}
    for entry in runs:
        flow_run_id = UUID(entry["flow_run_id"])
        task_run = by_run.get(flow_run_id)
        status = _site_status(task_run, reported) if task_run else None
        row = recorded.get(flow_run_id, {}).get(task_run.name) if task_run else None
        entry["site_status"] = status
        entry["cause"] = _cause(row) if status not in (None, "succeeded") else None
        for key in ("peak_rss_mb", "cpu_s"):
            value = row.get(key) if row else None
            entry[key] = value if isinstance(value, int | float) else None


def _cause(row: Mapping[str, Any] | None) -> str | None:
    """A summary row's cause; for a row recorded before causes were, its `error` or its last
    stderr line."""
    if row is None:
        return None
    for key in ("cause", "error"):
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    stderr = row.get("last_stderr")
    if isinstance(stderr, str) and stderr.strip():
        return stderr.split(" | ")[-1].strip() or None
    return None


def _site_entries(
    recent: Iterable[TaskRun], reported: Reported, streaks: Mapping[str, int]
) -> list[dict[str, Any]]:
    """The `sites` of `history`, by name: each one's last status, last run, last success,
    and its streak (how many recorded runs in a row it did not succeed)."""
    sites: dict[str, dict[str, Any]] = {}
    for task_run in recent:  # newest first
        entry = sites.get(task_run.name)
        if entry is None:
            entry = sites[task_run.name] = {
                "site": task_run.name,
                "last_status": _site_status(task_run, reported),
                "last_run_at": _iso(task_run.start_time or task_run.expected_start_time),
                "last_succeeded_at": None,
                "streak": streaks.get(task_run.name, 0),
            }
        if entry["last_succeeded_at"] is None and site_status(task_run.state) == "succeeded":
            entry["last_succeeded_at"] = _iso(task_run.end_time or task_run.start_time)
    return sorted(sites.values(), key=lambda entry: entry["site"])


def _clock(value: str | None, default: str = "") -> str:
    """An ISO time as `YYYY-MM-DD HH:MM:SS`."""
    return (value or default)[:19].replace("T", " ")


def _cut(text: str | None, width: int = CAUSE_WIDTH) -> str:
    text = " ".join((text or "").split())  # one line: a table cell
    return text if len(text) <= width else text[: width - 1] + "…"


def _amount(value: Any, spec: str) -> str:
    """A number in a table cell; blank for None (a row recorded before it was)."""
    return format(value, spec) if isinstance(value, int | float) else ""


def history_rows(
    data: dict[str, Any],
) -> tuple[tuple[list[str], list[list[str]]], tuple[list[str], list[list[str]]]]:
    """History as (columns, rows) for the runs and for the sites. With `--site`, the runs'
    `ok`/`failed` counts give way to the site's status, peak RSS (MB), CPU seconds and cause
    in each run. The sites have a `streak` column (`failed 2 runs in a row`) when one of them
    has a streak."""
    by_site = bool(data.get("site"))
    runs = []
    for run in data["runs"]:
        tail = (
            [
                run.get("site_status") or "",
                _amount(run.get("peak_rss_mb"), ".1f"),
                _amount(run.get("cpu_s"), ".2f"),
                _cut(run.get("cause")),
            ]
            if by_site
            else [str(run["succeeded"]), str(run["failed"])]
        )
        seconds = "" if run["duration_s"] is None else f"{run['duration_s']:.1f}"
        runs.append([_clock(run["start_time"]), run["state"] or "", seconds, *tail, run["name"]])
    streaks = any(entry.get("streak") for entry in data["sites"])  # else no column
    sites = [
        [
            entry["site"],
            entry["last_status"],
            _clock(entry["last_run_at"]),
            _clock(entry["last_succeeded_at"], "never"),
            *([health.streak_text(entry.get("streak", 0))] if streaks else []),
        ]
        for entry in data["sites"]
    ]
    counts = ["status", "peak MB", "CPU s", "cause"] if by_site else ["ok", "failed"]
    return (
        (["started", "state", "seconds", *counts, "name"], runs),
        (["site", "last status", "last run", "last succeeded", *(["streak"] * streaks)], sites),
    )


def format_history(data: dict[str, Any]) -> str:
    """History as two plain-text tables (for pipes and files)."""
    lines = [f"Last {len(data['runs'])} {FLOW_NAME} runs ({data['api']}):"]
    for columns, rows in history_rows(data):
        lines.extend([plain_table([c.upper() for c in columns], rows), ""])
    return "\n".join(lines).rstrip()
