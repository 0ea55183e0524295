"""One slot pool per flow run per process, shared by that process's task runs.

The flow's own process makes the pool when the flow starts and closes it when the flow
ends. Any other process that runs task runs (a Dask worker) makes one on its first task
run of that flow run, and closes it once no task run of that flow run has used it for
`IDLE_CLOSE_SECONDS`. The pools are a cache: anything in it can be rebuilt from the task
run's own parameter (`RunJob`), so a task run can run in any process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from uuid import UUID

from flows.slots.pool import SlotPool
from flows.slots.prefect_api import open_slot_pool

if TYPE_CHECKING:
    from flows.config import RunPlan

IDLE_CLOSE_SECONDS = 5.0


class RunJob(Protocol):
    """What a process needs to share a flow run's slots (`flows.engine.task.SiteJob`)."""

    @property
    def plan(self) -> RunPlan: ...

    @property
    def flow_run_id(self) -> UUID: ...

    @property
    def tags(self) -> Sequence[str]: ...


@dataclass
class LocalRun:
    """This process's share of one flow run: its slot pool, and whether the run stops."""

    pool: SlotPool
    stopping: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None
    users: int = 0

    def stop(self, reason: str) -> None:
        """Sites that have not finished end `cancelled`; their pipelines are stopped by
        the caller (`ProcessControl.stop_all`)."""
        self.stop_reason = self.stop_reason or reason
        self.stopping.set()


_local_runs: dict[UUID, LocalRun] = {}  # a cache: anything in it can be rebuilt from a SiteJob
_local_lock = threading.Lock()


@contextmanager
def local_run(job: RunJob, *, prefetch: int = 0, in_flow: bool = False) -> Iterator[LocalRun]:
    """This process's `LocalRun` for `job`'s flow run, made on first use, held for the block.

    The flow's own process (`in_flow`) hands slots out in list order and asks for
    `prefetch` slots up front; another process (a Dask worker) sees only some sites, so it
    hands them out as they ask, and gives each slot back before its task run ends (a worker
    may be stopped as soon as the last task run ends). A run no block holds is closed (its
    slots go back to the server) at once in the flow's process, else after
    `IDLE_CLOSE_SECONDS`.
    """
    config = job.plan.config
    with _local_lock:
        run = _local_runs.get(job.flow_run_id)
        if run is None:
            pool = open_slot_pool(
                config.concurrency_tag,
                job.plan.sites,
                holder_id=job.flow_run_id,
                prefetch=prefetch,
                patience=2.0 if in_flow else 0.0,
                park=in_flow,
                api_patience=config.api_patience,
                tags=job.tags,
            )
            run = _local_runs[job.flow_run_id] = LocalRun(pool)
        run.users += 1
    try:
        yield run
    finally:
        with _local_lock:
            run.users -= 1
            idle = run.users == 0
        if idle and in_flow:
            _close_if_idle(job.flow_run_id, run)
        elif idle:
            timer = threading.Timer(IDLE_CLOSE_SECONDS, _close_if_idle, (job.flow_run_id, run))
            timer.daemon = True
            timer.start()


def _close_if_idle(flow_run_id: UUID, run: LocalRun) -> None:
    with _local_lock:
        if run.users or _local_runs.get(flow_run_id) is not run:
            return
        del _local_runs[flow_run_id]
    run.pool.close()
