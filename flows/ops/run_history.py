"""`site-pipeline history`: the flow's last runs and each site's last status, from the API.

A site's status is its task run's state (`flows.engine.states.site_status`); for a Failed
task run, the status the flow run's summary table gave the site (`failed` or `timed_out`:
the state can't tell them apart). A run still running has no summary yet: its failed sites
show `failed` until it ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType, TaskRun

from flows.engine.baselines import summary_tables_of
from flows.engine.states import site_status
from flows.names import FLOW_NAME
from flows.ops.queries import latest_runs, task_runs
from flows.ops.server import api_target
from flows.report import plain_table

Reported = Mapping[UUID, Mapping[str, str]]
"""flow run id -> site -> the status its summary table gave the site."""


def history(limit: int = 10, site: str | None = None, scan: int = 5000) -> dict[str, Any]:
    """The last `limit` flow runs and, per site, its last status and last success."""
    with get_client(sync_client=True) as client:
        flow_runs = latest_runs(client, limit)
        in_runs = task_runs(client, [run.id for run in flow_runs], site, scan) if flow_runs else []
        recent = task_runs(client, None, site, scan)
        shown = [*in_runs, *_newest_per_site(recent)]
        tables = summary_tables_of(
            client, {run.flow_run_id for run in shown if run.flow_run_id and _failed(run)}
        )
    reported = {
        flow_run_id: {str(row.get("site")): str(row.get("status")) for row in rows}
        for flow_run_id, rows in tables.items()
    }
    return {
        "api": api_target(),
        "runs": _run_entries(flow_runs, _tally(in_runs, reported), site),
        "sites": _site_entries(recent, reported),
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


def _site_entries(recent: Iterable[TaskRun], reported: Reported) -> list[dict[str, Any]]:
    """The `sites` of `history`, by name: each one's last status, last run, last success."""
    sites: dict[str, dict[str, Any]] = {}
    for task_run in recent:  # newest first
        entry = sites.get(task_run.name)
        if entry is None:
            entry = sites[task_run.name] = {
                "site": task_run.name,
                "last_status": _site_status(task_run, reported),
                "last_run_at": _iso(task_run.start_time or task_run.expected_start_time),
                "last_succeeded_at": None,
            }
        if entry["last_succeeded_at"] is None and site_status(task_run.state) == "succeeded":
            entry["last_succeeded_at"] = _iso(task_run.end_time or task_run.start_time)
    return sorted(sites.values(), key=lambda entry: entry["site"])


def _clock(value: str | None, default: str = "") -> str:
    """An ISO time as `YYYY-MM-DD HH:MM:SS`."""
    return (value or default)[:19].replace("T", " ")


def history_rows(
    data: dict[str, Any],
) -> tuple[tuple[list[str], list[list[str]]], tuple[list[str], list[list[str]]]]:
    """History as (columns, rows) for the runs and for the sites."""
    runs = [
        [
            _clock(run["start_time"]),
            run["state"] or "",
            "" if run["duration_s"] is None else f"{run['duration_s']:.1f}",
            str(run["succeeded"]),
            str(run["failed"]),
            run["name"],
        ]
        for run in data["runs"]
    ]
    sites = [
        [
            entry["site"],
            entry["last_status"],
            _clock(entry["last_run_at"]),
            _clock(entry["last_succeeded_at"], "never"),
        ]
        for entry in data["sites"]
    ]
    return (
        (["started", "state", "seconds", "ok", "failed", "name"], runs),
        (["site", "last status", "last run", "last succeeded"], sites),
    )


def format_history(data: dict[str, Any]) -> str:
    """History as two plain-text tables (for pipes and files)."""
    lines = [f"Last {len(data['runs'])} {FLOW_NAME} runs ({data['api']}):"]
    for columns, rows in history_rows(data):
        lines.extend([plain_table([c.upper() for c in columns], rows), ""])
    return "\n".join(lines).rstrip()
