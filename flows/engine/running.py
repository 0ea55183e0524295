"""While the sites run: `running_sites(job, stop)`, and each site's report from its task run.

`running_sites` holds, for the length of the block, what the task runs need around them:

- the slot pool they share in this process (threads task runner; on Dask each worker makes
  its own, `flows.slots.sharing`);
- the task runner (`flows.engine.task_runners`);
- the stop watcher: once the caller's `StopRequest` is set, the sites not finished end
  cancelled and this run's pipelines are stopped;
- the emergency stop: when the block raises (the flow run is cancelled or crashing), this
  run's pipelines are stopped before the task runner waits for its threads, so none
  outlives the flow run;
- the halt (`HaltWatch`, `pipeline.halt`): the flow counts every site's final report, and
  once the rule trips no further site starts, in this process or on a Dask worker.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from prefect.client.schemas.objects import State
from prefect.task_runners import TaskRunner

from flows import report
from flows.config import PipelineConfig
from flows.dask_cluster import LocalDaskCluster
from flows.engine.failure import SiteAttemptFailed
from flows.engine.site_job import SiteJob
from flows.engine.states import site_status
from flows.engine.task_runners import task_runner
from flows.halt import HaltTally
from flows.interrupts import StopRequest
from flows.process.control import stop_everything
from flows.slots.sharing import LocalRun, local_run, write_halt_label

log = logging.getLogger(__name__)


@contextmanager
def running_sites(
    job: SiteJob, stop: StopRequest | None, cluster: LocalDaskCluster | None = None
) -> Iterator[tuple[TaskRunner[Any], HaltWatch]]:
    """The plan's task runner, started (on `cluster`, the caller's local Dask cluster, if
    one is given and the plan wants one), with the slot pool, the stop watcher and the
    emergency stop around it (see the module's docstring), and the run's `HaltWatch`."""
    plan, owner = job.plan, str(job.flow_run_id)
    config = plan.config
    in_process = config.task_runner.kind == "threads"
    with (
        local_run(job, prefetch=plan.max_concurrent_sites, in_flow=True)
        if in_process
        else nullcontext() as run,
        task_runner(plan, cluster) as runner,
        _stopping_on(stop, run, config, owner),
    ):
        try:
            yield runner, HaltWatch(job, run)
        except BaseException:
            # Cancelled or crashing: stop this run's pipelines now, before the task runner
            # waits for its threads, so none outlives the flow run. (On Dask, closing a
            # local cluster ends its workers, and their reapers stop their pipelines.)
            if run is not None:
                run.stopping.set()
                run.pool.stop_waits("the flow run is ending")
            stop_everything(config.process_control, config.kill_grace_seconds, owner=owner)
            raise


@contextmanager
def _stopping_on(
    stop: StopRequest | None, run: LocalRun | None, config: PipelineConfig, owner: str
) -> Iterator[None]:
    """While the sites run: once `stop` is requested, the sites not finished end cancelled
    and this run's pipelines are stopped (again every half second, for any that started
    in between). Threads task runner only: a Dask worker can't see this process's event."""
    if stop is None or run is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if stop.wait(0.2):
                run.stop(stop.reason or "the flow run is stopping")
                stop_everything(config.process_control, config.kill_grace_seconds, owner=owner)
                done.wait(0.5)

    watcher = threading.Thread(target=watch, name="site-pipeline-stop", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


class HaltWatch:
    """The flow's side of the halt (`flows.halt`): it sees every site's final report. Once
    the rule trips, no further site starts: in this process (`LocalRun.halt`; a task may have
    tripped it first, under its slot) and on Dask workers (the flow run's halt label, which a
    worker reads before a site starts, `flows.slots.sharing`)."""

    def __init__(self, job: SiteJob, run: LocalRun | None) -> None:
        self.job, self.run = job, run
        self.rule = job.plan.config.halt
        self.tally = run.tally if run is not None else HaltTally(self.rule)

    @property
    def reason(self) -> str | None:
        """Why the run halted, or None: it did not."""
        return self.tally.reason or (self.run.halt_reason if self.run is not None else None)

    def seen(self, site_report: report.SiteReport) -> report.SiteReport:
        """Count a site's final report (returned as it is); halt the run when it trips. (In
        the flow's process the tally is the tasks' too: one that tripped it halted the run.)"""
        if self.rule is None or self.tally.reason is not None:
            return site_report
        reason = self.tally.site_done(site_report.site, site_report.status)
        if reason is None:
            return site_report
        if self.run is not None:
            self.run.halt(reason)
            return site_report
        try:
            write_halt_label(self.job.flow_run_id, reason)
        except Exception as exc:  # the sites still end; the workers just don't hear of it
            log.warning("could not tell the workers that %s: %s", reason, exc)
        return site_report


def stopped_for(stop: StopRequest | None, seconds: float) -> Callable[[], bool]:
    """Whether `stop` was requested `seconds` ago or more: by then the running pipelines
    were stopped and the waiting sites cancelled, and what is left sleeps in a retry delay."""
    since: list[float] = []

    def given_up() -> bool:
        if stop is None or not stop.requested:
            return False
        if not since:
            since.append(time.monotonic())
        return time.monotonic() - since[0] >= seconds

    return given_up


def site_report(site: str, state: State[Any]) -> report.SiteReport:
    """The site's final report, from its task run's final state: the report the task
    returned or failed with (read back here, once, from the task run's result); else
    `cancelled` (cancelled, or never finished) or `failed`."""
    value = state.result(raise_on_failure=False) if state.is_final() else None
    if isinstance(value, SiteAttemptFailed):
        return value.report
    if isinstance(value, report.SiteReport) and (state.is_completed() or state.is_cancelled()):
        return value
    status: report.SiteStatus = "failed"
    if site_status(state) == "cancelled" or not state.is_final():
        status = "cancelled"
    error = state.message or (repr(value) if value is not None else None)
    return report.SiteReport(site, status, 0, None, 0.0, error)


def stopped_report(site: str, state: State[Any], run: LocalRun | None) -> report.SiteReport:
    """The report of a site the stopped run no longer waits for (`stopped_for`): in its
    retry delay, its last attempt's report (`LocalRun.retrying`), `cancelled`; else what
    its state says (`site_report`)."""
    failed = run.retrying.get(site) if run is not None else None
    if failed is None:
        return site_report(site, state)
    return dataclasses.replace(
        failed,
        status="cancelled",
        error=f"stopped in its retry delay; its last attempt: {failed.error}",
    )
