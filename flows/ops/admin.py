"""Talk to the Prefect API for `site-pipeline setup` and `site-pipeline history`."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterStartTime,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.client.schemas.objects import StateType, TaskRun
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import get_current_settings
from prefect.states import Crashed

from flows.config import ConfigError, RunPlan
from flows.names import FLOW_NAME
from flows.ops.resume import EarlierRun
from flows.process.holders import HOST_LABEL, PID_LABEL, holder_alive
from flows.slots.prefect_api import ensure_limit

DEFAULT_POOL = "site-pool"
DEFAULT_HEARTBEAT_GRACE = 90.0  # three heartbeats of the 30 s that prefect.yaml sets
PAGE = 200  # the API's largest page


class ApiUnreachable(RuntimeError):
    """No Prefect API can be used; the message names the URL that was tried."""


def api_target() -> str:
    """The configured API URL, or a description of the embedded default."""
    settings = get_current_settings()
    if settings.api.url:
        return str(settings.api.url)
    if not settings.server.ephemeral.enabled:
        raise ApiUnreachable(
            "no Prefect API: PREFECT_API_URL is not set and the embedded local server is "
            "disabled (PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false); start `prefect server start` "
            "and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return "the embedded local server (no PREFECT_API_URL set)"


def check_reachable() -> str:
    """Raise `ApiUnreachable` unless the configured API answers an authenticated request.

    Goes through Prefect's client, so the auth header and the CSRF token are the ones a
    run would send. Returns the target, with the server's version when it has one.
    """
    target = api_target()
    url = get_current_settings().api.url
    if not url:
        return target
    with get_client(sync_client=True) as client:
        try:
            version = client.api_version()
        except httpx.TransportError as exc:
            raise ApiUnreachable(
                f"cannot reach the Prefect API at {url} ({type(exc).__name__}: {exc}); "
                "check PREFECT_API_URL and that the server is running"
            ) from None
        except PrefectHTTPStatusError as exc:
            raise ApiUnreachable(_refusal(str(url), exc.response)) from None
    return f"{target} (Prefect server {version})"


def _refusal(url: str, response: httpx.Response) -> str:
    status = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    if response.status_code == 401:
        return (
            f"the Prefect API at {url} refused our credentials ({status}); set "
            "PREFECT_API_AUTH_STRING to the server's PREFECT_SERVER_API_AUTH_STRING "
            "(or PREFECT_API_KEY for Prefect Cloud)"
        )
    if response.status_code == 403:
        return (
            f"the Prefect API at {url} forbade the request ({status}: {response.text[:200]}); "
            "check PREFECT_API_AUTH_STRING (or PREFECT_API_KEY) and any proxy in front of it"
        )
    return f"the Prefect API at {url} answered {status}; check PREFECT_API_URL"


def setup(
    plan: RunPlan, pool: str = DEFAULT_POOL, heartbeat_grace: float = DEFAULT_HEARTBEAT_GRACE
) -> list[str]:
    """Create or update the process work pool, the concurrency limit, the notification
    blocks and automations (`flows.ops.notify`). Idempotent. Raises `ConfigError` before
    changing anything when a notification's URL variable is missing."""
    from flows.ops import notify

    notify.secret_urls(plan.config.notify)  # all of them, before any change
    changes = []
    with get_client(sync_client=True) as client:
        changes.append(_ensure_process_pool(client, pool))
        changes.append(ensure_limit(client, plan.config.concurrency_tag, plan.max_concurrent_sites))
        changes.extend(notify.setup_notifications(client, plan.config.notify, heartbeat_grace))
    return changes


def _ensure_process_pool(client: SyncPrefectClient, name: str) -> str:
    try:
        existing = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        return f"created process work pool {name!r}"
    if existing.type != "process":
        raise ValueError(
            f"work pool {name!r} exists with type {existing.type!r}; expected 'process'"
        )
    return f"process work pool {name!r} (unchanged)"


def _site_status(run: TaskRun) -> str:
    state = run.state
    if state is None:
        return "unknown"
    if state.type == StateType.COMPLETED:
        return "succeeded"
    if state.type == StateType.FAILED:
        return "timed_out" if "timed_out" in (state.message or "") else "failed"
    return {
        StateType.CANCELLED: "cancelled",
        StateType.CRASHED: "crashed",
        StateType.RUNNING: "running",
    }.get(state.type, (state.name or state.type.value).lower())


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _task_runs(
    client: SyncPrefectClient, flow_run_ids: Iterable[UUID] | None, site: str | None, most: int
) -> list[TaskRun]:
    """Task runs of the site-pipeline flow, newest first, at most `most`."""
    runs: list[TaskRun] = []
    while len(runs) < most:
        page = client.read_task_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            flow_run_filter=(
                FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids)))
                if flow_run_ids is not None
                else None
            ),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[site])) if site else None,
            sort=TaskRunSort.EXPECTED_START_TIME_DESC,
            limit=min(PAGE, most - len(runs)),
            offset=len(runs),
        )
        runs.extend(page)
        if len(page) < PAGE:
            break
    return runs


def history(limit: int = 10, site: str | None = None, scan: int = 5000) -> dict[str, Any]:
    """The last `limit` flow runs and, per site, its last status and last success."""
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
            sort=FlowRunSort.START_TIME_DESC,
            limit=limit,
        )
        in_runs = _task_runs(client, [run.id for run in flow_runs], site, scan) if flow_runs else []
        recent = _task_runs(client, None, site, scan)

    tally: dict[UUID, dict[str, int]] = {}
    for task_run in in_runs:
        if task_run.flow_run_id is None:
            continue
        counts = tally.setdefault(task_run.flow_run_id, {"succeeded": 0, "failed": 0})
        counts["succeeded" if _site_status(task_run) == "succeeded" else "failed"] += 1
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

    sites: dict[str, dict[str, Any]] = {}
    for task_run in recent:  # newest first
        entry = sites.setdefault(
            task_run.name,
            {
                "site": task_run.name,
                "last_status": _site_status(task_run),
                "last_run_at": _iso(task_run.start_time or task_run.expected_start_time),
                "last_succeeded_at": None,
            },
        )
        if entry["last_succeeded_at"] is None and _site_status(task_run) == "succeeded":
            entry["last_succeeded_at"] = _iso(task_run.end_time or task_run.start_time)
    return {
        "api": api_target(),
        "runs": runs,
        "sites": sorted(sites.values(), key=lambda entry: entry["site"]),
    }


def history_rows(
    data: dict[str, Any],
) -> tuple[tuple[list[str], list[list[str]]], tuple[list[str], list[list[str]]]]:
    """History as (columns, rows) for the runs and for the sites."""
    runs = [
        [
            (run["start_time"] or "")[:19].replace("T", " "),
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
            (entry["last_run_at"] or "")[:19].replace("T", " "),
            (entry["last_succeeded_at"] or "never")[:19].replace("T", " "),
        ]
        for entry in data["sites"]
    ]
    return (
        (["started", "state", "seconds", "ok", "failed", "name"], runs),
        (["site", "last status", "last run", "last succeeded"], sites),
    )


def format_history(data: dict[str, Any]) -> str:
    """History as two plain-text tables (for pipes and files)."""
    lines = [f"Last {len(data['runs'])} site-pipeline runs ({data['api']}):"]
    (run_columns, runs), (site_columns, sites) = history_rows(data)
    for columns, rows in ((run_columns, runs), (site_columns, sites)):
        widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns))]
        for row in [[c.upper() for c in columns], *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        lines.append("")
    return "\n".join(lines).rstrip()


def earlier_run(ref: str) -> EarlierRun:
    """The flow run that `--retry-failed REF` resumes: a flow run id, or `last` (the most
    recently started `site-pipeline` run). Raises `ConfigError` for a REF that names none."""
    from flows.config import load_plan

    with get_client(sync_client=True) as client:
        if ref == "last":
            found = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
                flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
                sort=FlowRunSort.START_TIME_DESC,
                limit=1,
            )
            if not found:
                raise ConfigError(
                    [f"--retry-failed last: no {FLOW_NAME} flow run on {api_target()}"]
                )
            run = found[0]
        else:
            try:
                run = client.read_flow_run(UUID(ref))
            except (ValueError, ObjectNotFound):
                raise ConfigError(
                    [
                        f"--retry-failed {ref!r}: expected `last` or the id of a flow run on "
                        f"{api_target()}"
                    ]
                ) from None
            flow = client.read_flow(run.flow_id)
            if flow.name != FLOW_NAME:
                raise ConfigError(
                    [
                        f"--retry-failed {ref}: flow run {run.name!r} is of flow {flow.name!r}; "
                        f"expected a {FLOW_NAME} run"
                    ]
                )
        deployment = None
        if run.deployment_id is not None:
            try:
                deployment = f"{FLOW_NAME}/{client.read_deployment(run.deployment_id).name}"
            except ObjectNotFound:
                pass
        outcomes: dict[str, str] = {}
        for task_run in _task_runs(client, [run.id], None, 1_000_000):
            name = (task_run.state.name if task_run.state else None) or "Pending"
            if outcomes.get(task_run.name) != "Completed":
                outcomes[task_run.name] = (
                    "Completed"
                    if task_run.state and (task_run.state.type == StateType.COMPLETED)
                    else name
                )
    params = dict(run.parameters)
    sites = params.get("sites")
    if not isinstance(sites, list):
        config_path = params.get("config_path")
        sites = list(load_plan(config_path if isinstance(config_path, str) else None).sites)
    state = run.state
    return EarlierRun(
        id=str(run.id),
        name=run.name,
        state=(state.name if state else None) or "Pending",
        final=bool(state and state.is_final()),
        parameters=params,
        sites=tuple(str(site) for site in sites),
        outcomes=outcomes,
        holder_alive=holder_alive(run.labels),
        deployment=deployment,
    )


def start_temporary_server() -> str | None:
    """Start the embedded default's temporary server now, its process tied to ours.

    With no PREFECT_API_URL, Prefect starts a temporary server on first use and stops it
    at interpreter exit; a `kill -9` (or a SIGTERM with no handler) skips that and the server
    stays behind. Started here, its pid goes to the reaper (a Job Object on Windows) as
    soon as it exists, so it ends with this process however this process ends. Prefect's
    client then finds the same server (one per process). Returns its URL, or None when a
    URL is configured (nothing to start).
    """
    if get_current_settings().api.url:
        return None
    from prefect.server.api.server import SubprocessASGIServer

    from flows.process.trees import end_with_us

    server = SubprocessASGIServer()
    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:
            failure.append(exc)

    starter = threading.Thread(target=start, name="temporary-prefect-server", daemon=True)
    starter.start()
    tied: set[int] = set()
    while True:  # tie each server process to us as soon as it exists (it may restart once)
        process = server.server_process
        if process is not None and process.pid not in tied:
            end_with_us(process.pid)
            tied.add(process.pid)
        if not starter.is_alive():
            break
        starter.join(0.05)
    if failure:
        raise failure[0]
    process = server.server_process
    if process is not None and process.pid not in tied:
        end_with_us(process.pid)
    return server.api_url


def mark_crashed(
    flow_run_id: str | UUID, message: str, client: SyncPrefectClient | None = None
) -> None:
    """Set a flow run left Running by a dead process to Crashed (forced: it is over)."""
    if client is None:
        with get_client(sync_client=True) as own:
            mark_crashed(flow_run_id, message, own)
        return
    client.set_flow_run_state(UUID(str(flow_run_id)), Crashed(message=message), force=True)


def doctor(plan: RunPlan | None, fix: bool = False) -> tuple[list[str], bool]:
    """What `site-pipeline doctor` reports, and whether all is well (after `fix`).

    - the server's version, and the concurrency limit against the config's cap;
    - slots still held by pools of dead processes on this host (`flows.slots.ledger`);
    - `site-pipeline` flow runs Running or Pending whose process is gone (by the labels the
      flow sets, `flows.process.holders.HOLDER_LABELS`); with `fix`, they are marked Crashed and the
      slots are given back.
    """
    from prefect.client.schemas.filters import FlowRunFilterState, FlowRunFilterStateType

    from flows.slots.prefect_api import reclaim

    lines: list[str] = []
    healthy = True
    with get_client(sync_client=True) as client:
        lines.append(f"server version: {client.api_version()}")
        if plan is not None:
            tag, cap = plan.config.concurrency_tag, plan.max_concurrent_sites
            try:
                limit = client.read_global_concurrency_limit_by_name(tag)
            except ObjectNotFound:
                lines.append(f"limit {tag!r}: missing (config: {cap}); `setup` or a run creates it")
            else:
                same = "matches the config" if limit.limit == cap else f"config says {cap}"
                lines.append(
                    f"limit {tag!r}: {limit.limit} ({same}), {limit.active_slots} slot(s) in use"
                )
        freed = reclaim(client, dry_run=not fix)
        healthy = healthy and (fix or not freed)
        lines.extend(freed or ["no slots held by dead processes on this host"])
        stuck = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
                )
            ),
            limit=PAGE,
        )
        found = 0
        for run in stuck:
            alive = holder_alive(run.labels)
            where = run.labels.get(HOST_LABEL, "an unknown host")
            if alive is None:
                lines.append(
                    f"flow run {run.name} ({run.id}) is {run.state_name}; its process is on "
                    f"{where}, which this host can't check"
                )
            elif not alive:
                found += 1
                pid = run.labels.get(PID_LABEL)
                if fix:
                    mark_crashed(
                        run.id, f"its process ({pid} on {where}) is gone (doctor --fix)", client
                    )
                    lines.append(f"flow run {run.name} ({run.id}): process {pid} gone; Crashed")
                else:
                    lines.append(
                        f"flow run {run.name} ({run.id}) is {run.state_name} but its process "
                        f"({pid}) is gone; `doctor --fix` marks it Crashed"
                    )
        if not found:
            lines.append("no flow runs left Running by a dead process on this host")
        healthy = healthy and (fix or not found)
    return lines, healthy
