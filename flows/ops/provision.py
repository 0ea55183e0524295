"""`site-pipeline setup`: the process work pool, the concurrency limit and the notifications
on the Prefect server, created or brought up to date (idempotent)."""

from __future__ import annotations

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound

from flows.config import ConfigError, RunPlan, group_limit_name
from flows.slots.prefect_api import ensure_limit

DEFAULT_POOL = "site-pool"
DEFAULT_HEARTBEAT_GRACE = 90.0  # three heartbeats of the 30 s that prefect.yaml sets
# Prefect's shortest heartbeat interval (PREFECT_FLOWS_HEARTBEAT_FREQUENCY >= 30): a grace no
# longer than it would crash healthy runs between two heartbeats.
MIN_HEARTBEAT_FREQUENCY = 30


def setup(
    plan: RunPlan, pool: str = DEFAULT_POOL, heartbeat_grace: float = DEFAULT_HEARTBEAT_GRACE
) -> list[str]:
    """Create or update the process work pool, the concurrency limit and each group's
    (`pipeline.groups`), the notification blocks and automations (`flows.ops.notify`).
    Idempotent. Raises `ConfigError` before changing anything when a notification's URL
    variable is missing or `heartbeat_grace` is not above Prefect's shortest heartbeat
    interval."""
    from flows.ops import notify

    check_heartbeat_grace(heartbeat_grace)
    notify.secret_urls(plan.config.notify)  # all of them, before any change
    changes = []
    with get_client(sync_client=True) as client:
        changes.append(_ensure_process_pool(client, pool))
        changes.append(ensure_limit(client, plan.config.concurrency_tag, plan.max_concurrent_sites))
        for group, cap in plan.group_limits.items():  # each group's own cap (issue 21)
            changes.append(
                ensure_limit(client, group_limit_name(plan.config.concurrency_tag, group), cap)
            )
        changes.extend(notify.setup_notifications(client, plan.config.notify, heartbeat_grace))
    return changes


def check_heartbeat_grace(grace: float) -> None:
    """Raise `ConfigError` unless `grace` is longer than Prefect's shortest heartbeat
    interval (a proactive trigger's own minimum, 10 s, is below it)."""
    if not grace > MIN_HEARTBEAT_FREQUENCY:
        raise ConfigError(
            [
                f"--heartbeat-grace {grace:g}: expected more than {MIN_HEARTBEAT_FREQUENCY} "
                f"seconds (Prefect sends a flow run's heartbeats {MIN_HEARTBEAT_FREQUENCY} s "
                "apart at the shortest)"
            ]
        )


def _ensure_process_pool(client: SyncPrefectClient, name: str) -> str:
    """Create the process work pool `name` unless it exists; refuse one of another type."""
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
