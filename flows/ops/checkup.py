"""`site-pipeline doctor`: the server, the concurrency limit, who holds its slots, slots
held by dead processes and flow runs whose process is gone; with `--fix`, the slots are
given back and the runs marked Crashed. (Named `checkup`, not `health`: `flows.health` is a
site's health, and a module named `doctor` would shadow the function `flows.ops.doctor`.)"""

from __future__ import annotations

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import ObjectNotFound

from flows.config import RunPlan, group_limit_name
from flows.engine.baselines import PAGE
from flows.ops.queries import of_the_flow
from flows.ops.resume import mark_crashed
from flows.process.holders import HOST_LABEL, PID_LABEL, holder_alive
from flows.slots.prefect_api import describe_status
from flows.slots.reclaim import reclaim
from flows.slots.slot_holders import holders


def doctor(plan: RunPlan | None, fix: bool = False) -> tuple[list[str], bool]:
    """What `site-pipeline doctor` reports, and whether all is well (after `fix`).

    - the server's version and where it keeps concurrency leases (`lease_storage_line`),
      the concurrency limit against the config's cap, and each group's limit against its cap;
    - who holds each limit's slots in use, and which are orphaned (`holders`);
    - slots held by pools of dead processes on this host (`flows.slots.ledger`), or by no
      live process (`reclaim`);
    - `site-pipeline` flow runs Running or Pending whose process is gone (by the labels the
      flow sets, `flows.process.holders.HOLDER_LABELS`); with `fix`, they are marked Crashed
      and the slots are given back.
    """
    with get_client(sync_client=True) as client:
        lines = [f"server version: {client.api_version()}", lease_storage_line(client)]
        names: list[str] = []
        if plan is not None:
            lines.append(_limit_line(client, plan))
            lines.extend(_group_lines(client, plan))
            tag = plan.config.concurrency_tag
            names = [tag, *(group_limit_name(tag, group) for group in plan.group_limits)]
            lines.extend(_holder_lines(client, names))
        freed = reclaim(client, dry_run=not fix, names=names)
        nothing = "no slots to give back: none held by a dead process of this host, or by none"
        lines.extend(freed or [nothing])
        stuck_lines, found = _stuck_runs(client, fix)
        lines.extend(stuck_lines)
    return lines, fix or not (freed or found)


# What each lease storage Prefect 3.9 ships means for the cap when the API restarts.
_LEASE_STORAGES = {
    "prefect.server.concurrency.lease_storage.memory": (
        "in the API process's memory: a restart forgets the leases (a run gives their "
        "slots back by name), and several API servers don't share them"
    ),
    "prefect.server.concurrency.lease_storage.filesystem": (
        "on the API server's disk: a restart keeps them; not shared by several API servers"
    ),
    "prefect_redis.lease_storage": (
        "in Redis: a restart of the API keeps them, and every API server shares them"
    ),
}


def lease_storage_line(client: SyncPrefectClient) -> str:
    """Where the server keeps concurrency leases: `server.concurrency.lease_storage` of
    the settings its API reports (`GET /admin/settings`), or why that can't be told."""
    try:
        response = client.request("GET", "/admin/settings")
        response.raise_for_status()
        storage = response.json()["server"]["concurrency"]["lease_storage"]
    except httpx.HTTPStatusError as exc:
        return (
            f"lease storage: cannot tell (GET /admin/settings answered "
            f"{describe_status(exc.response)}; "
            "Prefect Cloud and some proxies don't expose the server's settings)"
        )
    except (httpx.TransportError, ValueError, KeyError, TypeError) as exc:
        return f"lease storage: cannot tell (GET /admin/settings: {type(exc).__name__}: {exc})"
    meaning = _LEASE_STORAGES.get(str(storage), "a storage this tool doesn't know")
    return f"lease storage: {storage} ({meaning})"


def _limit_line(client: SyncPrefectClient, plan: RunPlan) -> str:
    """The concurrency limit on the server against the config's cap."""
    tag, cap = plan.config.concurrency_tag, plan.max_concurrent_sites
    try:
        limit = client.read_global_concurrency_limit_by_name(tag)
    except ObjectNotFound:
        return f"limit {tag!r}: missing (config: {cap}); `setup` or a run creates it"
    same = "matches the config" if limit.limit == cap else f"config says {cap}"
    return f"limit {tag!r}: {limit.limit} ({same}), {limit.active_slots} slot(s) in use"


def _group_lines(client: SyncPrefectClient, plan: RunPlan) -> list[str]:
    """Each group's limit on the server against its cap in the config."""
    lines = []
    for group, cap in plan.group_limits.items():
        name = group_limit_name(plan.config.concurrency_tag, group)
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            lines.append(
                f"group limit {name!r}: missing (config: {cap}); `setup` or a run creates it"
            )
            continue
        same = "matches the config" if limit.limit == cap else f"config says {cap}"
        lines.append(
            f"group limit {name!r}: {limit.limit} ({same}), {limit.active_slots} slot(s) in use"
        )
    return lines


def _holder_lines(client: SyncPrefectClient, names: list[str]) -> list[str]:
    """Who holds each limit's slots in use: a run of this host (alive or dead: orphaned),
    another host's, or nobody (orphaned, on the embedded default)."""
    lines = []
    for name in names:
        try:
            held = holders(client, name)
        except ObjectNotFound:
            continue
        for entry in held:
            orphaned = entry.endswith((", dead)", "no live process"))
            lines.append(f"  {name!r}: {entry}{' (orphaned)' if orphaned else ''}")
    return lines


def _stuck_runs(client: SyncPrefectClient, fix: bool) -> tuple[list[str], int]:
    """A line per unfinished flow run whose process is gone or can't be checked, and how
    many are gone (with `fix`, marked Crashed)."""
    unfinished = client.read_flow_runs(
        flow_filter=of_the_flow(),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
            )
        ),
        limit=PAGE,
    )
    lines: list[str] = []
    found = 0
    for run in unfinished:
        alive = holder_alive(run.labels)
        if alive is None:
            where = run.labels.get(HOST_LABEL, "an unknown host")
            lines.append(
                f"flow run {run.name} ({run.id}) is {run.state_name}; its process is on "
                f"{where}, which this host can't check"
            )
        elif not alive:
            found += 1
            lines.append(_gone(client, run, fix))
    if not found:
        lines.append("no flow runs left Running by a dead process on this host")
    return lines, found


def _gone(client: SyncPrefectClient, run: FlowRun, fix: bool) -> str:
    """A flow run whose process is gone: marked Crashed with `fix`; the line that says so."""
    pid = run.labels.get(PID_LABEL)
    if not fix:
        return (
            f"flow run {run.name} ({run.id}) is {run.state_name} but its process "
            f"({pid}) is gone; `doctor --fix` marks it Crashed"
        )
    where = run.labels.get(HOST_LABEL, "an unknown host")
    mark_crashed(run.id, f"its process ({pid} on {where}) is gone (doctor --fix)", client)
    return f"flow run {run.name} ({run.id}): process {pid} gone; Crashed"
