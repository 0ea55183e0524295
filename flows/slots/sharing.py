"""One slot pool per flow run per process, shared by that process's task runs.

The flow's own process makes the pool when the flow starts and closes it when the flow
ends. Any other process that runs task runs (a Dask worker) makes one on its first task
run of that flow run, and closes it once no task run of that flow run has used it for
`IDLE_CLOSE_SECONDS`. The pools are a cache: anything in it can be rebuilt from the task
run's own parameter (`RunJob`), so a task run can run in any process.

A halt (`pipeline.halt`, `flows.halt`) reaches every process the way the flow decides it: in
the flow's process it is `LocalRun.halt`; the flow also writes it on its flow run as the label
`HALT_LABEL`, which a Dask worker reads before a site starts and, for `when: now`, polls while
it runs sites (`HALT_POLL_SECONDS`), so it stops its own pipelines too.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from uuid import UUID

from prefect.client.orchestration import get_client

from flows.halt import HaltTally
from flows.process.control import stop_everything
from flows.slots.pool import SlotPool
from flows.slots.prefect_pool import open_slot_pool, site_limit_names

if TYPE_CHECKING:
    from flows.config import RunPlan
    from flows.report import SiteReport

IDLE_CLOSE_SECONDS = 5.0
HALT_LABEL = "site-pipeline.halt"  # on the flow run: the halt's reason, once it halted
HALT_POLL_SECONDS = 1.0

log = logging.getLogger(__name__)


class RunJob(Protocol):
    """What a process needs to share a flow run's slots (`flows.engine.site_job.SiteJob`)."""

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
    tally: HaltTally = field(default_factory=lambda: HaltTally(None))
    halt_now: bool = False  # `halt.when: now`: a halt stops the running pipelines too
    halt_reason: str | None = None  # set once the run halted: no further site starts
    stop_pipelines: Callable[[], object] = lambda: None  # this run's, in this process
    read_halt: Callable[[], str | None] | None = None  # a worker's: the flow's halt label
    polling: threading.Event = field(default_factory=threading.Event)  # set: poller ends
    # site -> its last failed attempt's report while it waits to retry: a stop keeps it
    retrying: dict[str, SiteReport] = field(default_factory=dict)

    def stop(self, reason: str) -> None:
        """Sites that have not finished end `cancelled`; their pipelines are stopped by
        the caller (`ProcessControl.stop_all`)."""
        self.stop_reason = self.stop_reason or reason
        self.stopping.set()
        self.pool.stop_waits(reason)  # a site waiting for a slot ends its wait now

    def site_done(self, site: str, status: str) -> str | None:
        """Count `site`, finally `status`, towards the halt rule; halts the run when it trips
        (see `halt`). The halt's reason, or None."""
        reason = self.tally.site_done(site, status)
        if reason is not None:
            self.halt(reason)
        return reason

    def halt(self, reason: str) -> None:
        """No further site starts; with `when: now` the running ones are stopped too (they
        end `cancelled`, like a stop), from another thread so the caller doesn't wait."""
        if self.halt_reason is not None:
            return
        self.halt_reason = reason
        self.pool.stop_waits(f"halted: {reason}")  # no further site starts
        if self.halt_now:
            self.stop(reason)
            threading.Thread(target=self.stop_pipelines, name="site-pipeline-halt").start()

    def halted(self, fresh: bool = False) -> str | None:
        """The halt's reason, or None. `fresh`: on a Dask worker, ask the flow run now."""
        if self.halt_reason is None and fresh and self.read_halt is not None:
            reason = self.read_halt()
            if reason:
                self.halt(reason)
        return self.halt_reason


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
                wait_notice=config.slot_wait_notice,
                tags=job.tags,
                groups=job.plan.site_groups,
                group_limits=job.plan.group_limits,
            )
            run = _local_runs[job.flow_run_id] = _new_run(job, pool, in_flow)
        else:  # made by the flow or another site's task run: this site joins its pool
            names = site_limit_names(config.concurrency_tag, job.plan.site_groups)
            run.pool.add_sites(job.plan.sites, names)
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


def _new_run(job: RunJob, pool: SlotPool, in_flow: bool) -> LocalRun:
    """A `LocalRun` with the halt rule; a worker's reads the flow's halt label, and for
    `when: now` polls it while the run lives (`_poll_halt`)."""
    config = job.plan.config
    # A worker sees only some sites: its own count of failures is a sound lower bound for a
    # count rule, but its share of failures says nothing of the run's.
    local_rule = config.halt if in_flow or (config.halt and config.halt.failed) else None
    run = LocalRun(
        pool,
        tally=HaltTally(local_rule),
        halt_now=config.halt is not None and config.halt.when == "now",
        stop_pipelines=functools.partial(
            stop_everything,
            config.process_control,
            config.kill_grace_seconds,
            owner=str(job.flow_run_id),
        ),
    )
    if config.halt is not None and not in_flow:
        run.read_halt = functools.partial(read_halt_label, job.flow_run_id)
        if run.halt_now:
            # The task run's context carries the settings (the API URL) on a worker.
            context = contextvars.copy_context()
            poller = threading.Thread(
                target=context.run,
                args=(_poll_halt, run),
                name="site-pipeline-halt-poll",
                daemon=True,
            )
            poller.start()
    return run


def read_halt_label(flow_run_id: UUID) -> str | None:
    """The halt's reason the flow wrote on its flow run (`write_halt_label`), or None; None
    too when the API can't be read (the next check asks again)."""
    try:
        with get_client(sync_client=True) as client:
            labels = client.read_flow_run(flow_run_id).labels
    except Exception as exc:  # an unreadable API must not fail a site
        log.debug("halt label of %s: %s", flow_run_id, exc)
        return None
    value = labels.get(HALT_LABEL)
    return str(value) if value else None


def write_halt_label(flow_run_id: UUID, reason: str) -> None:
    """Tell every process running this flow run's sites that it halted (`read_halt_label`)."""
    with get_client(sync_client=True) as client:
        client.update_flow_run_labels(flow_run_id, {HALT_LABEL: reason})


def _poll_halt(run: LocalRun) -> None:
    """A worker's halt watcher (`when: now`): until the run closes, read the halt label."""
    while not run.polling.wait(HALT_POLL_SECONDS):
        if run.halted(fresh=True) is not None:
            return


def _close_if_idle(flow_run_id: UUID, run: LocalRun) -> None:
    with _local_lock:
        if run.users or _local_runs.get(flow_run_id) is not run:
            return
        del _local_runs[flow_run_id]
    run.polling.set()
    run.pool.close()
