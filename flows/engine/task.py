"""The `run_site` task: one attempt of one site's pipeline per task run attempt.

Prefect drives the retries (`retries`, `retry_delay_seconds`,
`retry_jitter_factor`, `retry_condition_fn`); this task runs one attempt, holding
a concurrency slot only while the pipeline process runs.

The task is self-contained: its `SiteJob` parameter carries the plan and the flow run,
so any process can run it (a thread of the flow's process, or a Dask worker). Each
process shares one slot pool per flow run (`flows.slots.sharing`).

An attempt is run by `AttemptEngine`, in the shape of Prefect's own task engine: prepare,
run under the slot (`begin_run`), one handler per outcome (`handle_success`,
`handle_check_failure`, `handle_retry`, `handle_failure`, `handle_no_slot`,
`handle_cancelled`) returning a `Handled` (data), and `end`, the one place a site is
finished. Whether a failure is retried is decided once, by
`flows.engine.outcomes.retry_decision`.

Each attempt's full output goes to its log file (`flows.process.logfile`), under the site's
output folder; the first attempt of a site in a run prunes the older runs' logs
(`keep_logs`). The report lists this run's attempt logs as absolute paths.

The halt (`pipeline.halt`, `flows.halt`) is checked where a site is about to start: before it
asks for a slot, and again once it has one. A final failure is counted while its slot is still
held (`LocalRun.site_done`), so the site that would get that slot next already sees the halt.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import Task, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.runtime import task_run as current_task_run
from prefect.states import Cancelled
from prefect.task_runners import TaskRunner
from prefect.utilities.annotations import NotSet

from flows.backoff import retry_delays
from flows.checks import check_result
from flows.config import RunPlan, build_argv, site_output_dir
from flows.engine.failure import SiteAttemptFailed
from flows.engine.logfilter import install_traceback_filter
from flows.engine.outcomes import RetryDecision, retry_decision
from flows.names import PIPELINE_OUTPUT, SITE_EVENT
from flows.process.attempt import AttemptOutcome, run_attempt
from flows.process.control import control_for
from flows.process.logfile import attempt_log_path, prune_logs, run_logs
from flows.report import SiteReport, attempt_usage, with_usage
from flows.slots import SlotError, WaitStopped
from flows.slots.sharing import LocalRun, local_run
from flows.timeouts import SiteTimeout, site_timeout


class SiteJob:
    """What every `run_site` task run of one flow run needs, whichever process runs it.

    A plain class on purpose: Prefect walks the dataclasses and models in a task's
    parameters once per task run. The flow's job holds the whole plan; each task run gets
    `for_site`, its own site's share, so what a task run carries does not grow with the
    site list: a Dask scheduler keeps every submitted task's parameters, unpickled, until
    the flow lets go of its future (with the whole plan in each, 500 sites cost the flow's
    process 0.45 MB a site, growing as the square of the site count).
    """

    __slots__ = ("check_history", "flow_run_id", "plan", "tags", "timeouts", "usage")

    def __init__(
        self,
        plan: RunPlan,
        flow_run_id: UUID,
        tags: tuple[str, ...],
        check_history: dict[str, list[float]] | None = None,
        timeouts: dict[str, SiteTimeout] | None = None,
    ) -> None:
        self.plan = plan
        self.flow_run_id = flow_run_id
        self.tags = tags  # the task runs' tags, for the tag-limit check shortcut
        self.check_history = check_history or {}  # result checks: earlier values per site
        self.timeouts = timeouts or {}  # each site's attempt timeout (flows.timeouts)
        self.usage: dict[str, list[dict[str, Any]]] = {}  # site -> its attempts' usage

    def for_site(self, site: str) -> SiteJob:
        """The job as `site`'s task run needs it: the plan with only `site` (its own entry,
        if any; the config without its site list), its timeout and its check history."""
        plan = self.plan
        config = plan.config.model_copy(update={"sites": None, "sites_file": None})
        own = replace(
            plan,
            config=config,
            sites=(site,),
            settings={site: plan.settings[site]} if site in plan.settings else {},
            given={site: plan.given[site]} if site in plan.given else {},
        )
        history = {site: self.check_history[site]} if site in self.check_history else None
        timeouts = {site: self.timeouts[site]} if site in self.timeouts else None
        return SiteJob(own, self.flow_run_id, self.tags, history, timeouts)

    def timeout(self, site: str) -> SiteTimeout:
        return self.timeouts.get(site) or site_timeout((), None, self.plan.site(site).timeout)

    def record_usage(
        self, site: str, attempt: int, outcome: AttemptOutcome
    ) -> list[dict[str, Any]]:
        """`site`'s attempts' usage (peak RSS, CPU seconds) in attempt order, this one last.
        Prefect runs a task run's retries in the same call, with the same parameters, so the
        job that ran attempt 1 of a site also runs its attempt 2, in whichever process."""
        kept = [entry for entry in self.usage.get(site, []) if entry["attempt"] < attempt]
        kept.append(attempt_usage(attempt, outcome.peak_rss_mb, outcome.cpu_s))
        self.usage[site] = kept
        return kept


def _should_retry(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's retry_condition_fn: the attempt's own decision (`retry_decision`, carried in
    `SiteAttemptFailed.retryable`); anything else (a bug in this tool) is retried."""
    error = state.data
    return not isinstance(error, SiteAttemptFailed) or error.retryable


def site_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """A site's result is reused only within its own flow run: when that run is retried
    (the UI's Retry, `prefect flow-run retry`), the sites that succeeded come back from the
    result cache without running (or taking a slot); the others run again. A new run never
    reuses anything."""
    flow_run_id = context.task_run.flow_run_id
    return f"site-pipeline-{flow_run_id}-{parameters['site']}" if flow_run_id else None


@task(
    name="run_site",
    task_run_name="{site}",
    cache_key_fn=site_cache_key,
    persist_result=True,  # a succeeded site's report, so a retry of the flow run can reuse it
    retry_condition_fn=_should_retry,
)
def run_site(site: str, job: SiteJob) -> dict[str, Any] | State[Any]:
    """Run one attempt of `site`'s pipeline. Returns its report; raises on failure; returns
    a Cancelled state (its data the report) when the flow run is stopping."""
    install_traceback_filter()  # in whichever process runs it (the flow's, a Dask worker)
    with local_run(job) as run:
        return _attempt(site, job, run)


def _attempt(site: str, job: SiteJob, run: LocalRun) -> dict[str, Any] | State[Any]:
    """Prepare the attempt, run it under a slot, and end it through its outcome's handler."""
    engine = AttemptEngine(site, job, run, max(1, int(current_task_run.run_count)))
    try:
        out_dir = site_output_dir(job.plan.output_dir, site)
        out_dir.mkdir(parents=True, exist_ok=True)
    except BaseException as exc:
        # It will never ask for a slot: don't keep others waiting.
        return engine.end(Handled(exc))
    return engine.end(engine.dispatch(engine.begin_run(out_dir), out_dir))


@dataclass(frozen=True)
class Handled:
    """An attempt's outcome as data: what the task run returns or raises (`result`), whether
    the site is done (`final`: it will not ask for a slot again), and the log line to write
    (`message`, `args`, `level`, `event`)."""

    result: dict[str, Any] | State[Any] | BaseException
    final: bool = True
    level: int = logging.INFO
    message: str | None = None
    args: tuple[Any, ...] = ()
    event: str | None = None


def _report_data(report: SiteReport) -> dict[str, Any]:
    """A report as a task run's result: its JSON, and its stderr tail for the console."""
    return report.to_json() | {"stderr_tail": report.stderr_tail}


class AttemptEngine:
    """One attempt of one site, in the shape of Prefect's task engine: `begin_run` runs the
    pipeline under a slot, `dispatch` picks the outcome's handler, `end` acts on it."""

    def __init__(
        self,
        site: str,
        job: SiteJob,
        run: LocalRun,
        attempt: int,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self.site, self.job, self.run, self.attempt = site, job, run, attempt
        self.config = job.plan.config
        self.settings = job.plan.site(site)  # the site's own entry, else the config's
        self.of = self.settings.retry_count
        self.limit = job.timeout(site)
        self.logger = logger if logger is not None else get_run_logger()
        self.counted = False  # this attempt's final outcome was counted towards the halt

    def begin_run(self, out_dir: Path) -> AttemptOutcome | SlotError | None:
        """Run the pipeline while holding a slot. None: the flow run stopped before it began."""
        argv = build_argv(self.config, self.site, self.attempt, out_dir, self.settings.flags)
        env = {
            **os.environ,
            **self.settings.env,  # the config's env, with the site's own over it
            "SITE": self.site,
            "SITE_ATTEMPT": str(self.attempt),
            "SITE_OUTPUT_DIR": str(out_dir),
            "SITE_FLOW_RUN_ID": str(self.job.flow_run_id),
        }
        if self._held_back(fresh=False):
            return None
        try:
            with self.run.pool.slot(self.site, on_long_wait=self._long_wait):
                if self._held_back(fresh=True):
                    return None
                if self.attempt == 1:
                    self._prune_logs(out_dir)
                outcome = self._run_pipeline(argv, env, out_dir)
                self._count(outcome)
                return outcome
        except SlotError as exc:
            return exc
        except WaitStopped:  # the run stops or halted while this site waited
            return None

    def _long_wait(self, line: str) -> None:
        """A long wait for a slot: who holds the cap, in the site's log and the live view."""
        self.logger.warning(line, extra={SITE_EVENT: "waiting"})

    def _held_back(self, fresh: bool) -> bool:
        """The flow run stops or halted: this attempt does not start."""
        return self.run.stopping.is_set() or self.run.halted(fresh=fresh) is not None

    def _count(self, outcome: AttemptOutcome) -> None:
        """A final failure (or a success) counts towards the halt while the slot is held,
        unless the run is stopping (a stopped pipeline is not a failure of its own)."""
        if self.run.stopping.is_set():
            return
        status = outcome.status
        if status != "succeeded" and self.decision(outcome).retry:
            return
        self.counted = True
        self.run.site_done(self.site, "failed" if status == "not_started" else status)

    def _prune_logs(self, out_dir: Path) -> None:
        """The older runs' attempt logs go (`keep_logs`); that failing is only a warning."""
        try:
            prune_logs(out_dir, self.config.keep_logs, current=str(self.job.flow_run_id))
        except Exception as exc:
            self.logger.warning("could not delete old attempt logs in %s: %s", out_dir, exc)

    def _log_paths(self, out_dir: Path) -> list[str]:
        """This run's attempt logs of the site, in attempt order (absolute paths)."""
        try:
            return [str(path) for path in run_logs(out_dir, str(self.job.flow_run_id))]
        except OSError:
            return []

    def _run_pipeline(self, argv: list[str], env: dict[str, str], out_dir: Path) -> AttemptOutcome:
        config, logger = self.config, self.logger
        logger.info(
            "attempt %d/%d started; %s",
            self.attempt,
            self.of,
            self.limit.why,
            extra={SITE_EVENT: "started"},
        )
        logger.debug("argv: %s", argv)
        return run_attempt(
            argv,
            cwd=self.job.plan.working_dir,
            env=env,
            timeout=self.limit.seconds,
            kill_grace=config.kill_grace_seconds,
            log=lambda line: logger.info(line, extra={PIPELINE_OUTPUT: True}),
            max_log_lines=config.max_log_lines,
            owner=str(self.job.flow_run_id),
            control=control_for(config.process_control),
            stall_timeout=config.stall_timeout,
            log_file=attempt_log_path(out_dir, str(self.job.flow_run_id), self.attempt),
            warn=logger.warning,
            memory_limit=self.settings.memory_limit,
        )

    def dispatch(
        self, outcome: AttemptOutcome | SlotError | None, out_dir: Path | None = None
    ) -> Handled:
        """The handler of `begin_run`'s outcome (`out_dir`: where its attempt logs are). A
        site whose own outcome tripped a `when: now` halt is not cancelled by it."""
        stopping = self.run.stopping.is_set() and not self.counted
        if outcome is None or (isinstance(outcome, SlotError) and stopping):
            return self.handle_cancelled(self.attempt - 1)
        if isinstance(outcome, SlotError):
            return self.handle_no_slot(outcome)
        usage = self.job.record_usage(self.site, self.attempt, outcome)
        if stopping:
            return self.handle_cancelled(
                self.attempt, outcome.duration_s, outcome.stderr_tail, usage
            )
        report = SiteReport(
            site=self.site,
            status="failed" if outcome.status == "not_started" else outcome.status,
            attempts=self.attempt,
            exit_code=outcome.exit_code,
            duration_s=outcome.duration_s,
            error=outcome.error,
            result=outcome.result,
            stderr_tail=outcome.stderr_tail,
            timeout_s=self.limit.seconds,
            cause=outcome.cause,
            logs=self._log_paths(out_dir) if out_dir is not None else [],
        )
        with_usage(report, usage)
        if outcome.status == "succeeded":
            return self.handle_success(outcome, report)
        return self.handle_failure(outcome, report)

    def handle_success(self, outcome: AttemptOutcome, report: SiteReport) -> Handled:
        """The pipeline succeeded: the result checks (if any) have the last word."""
        checks = self.config.result_checks
        if checks is not None:
            history = self.job.check_history.get(self.site, ())
            verdict = check_result(outcome.result, checks, history)
            report.check = verdict.to_json(checks.field)
            if not verdict.ok and checks.on_fail == "fail":
                return self.handle_check_failure(report, verdict.reason)
            if not verdict.ok:
                self.logger.warning(
                    "result check: %s (on_fail: warn; the site succeeds)", verdict.reason
                )
        return Handled(
            message="attempt %d/%d succeeded in %.1fs",
            args=(self.attempt, self.of, outcome.duration_s),
            event="succeeded",
            result=_report_data(report),
        )

    def handle_check_failure(self, report: SiteReport, reason: str | None) -> Handled:
        """The scraper ran fine and the data is what it is: retrying can't help."""
        report.status, report.kind, report.error = "failed", "result check", reason
        return Handled(
            level=logging.ERROR,
            message="attempt %d/%d: result check failed: %s; not retried",
            args=(self.attempt, self.of, reason),
            event="failed",
            result=SiteAttemptFailed(report, retryable=False),
        )

    def handle_failure(self, outcome: AttemptOutcome, report: SiteReport) -> Handled:
        """Failed, timed out or could not start: retried (`handle_retry`), or final."""
        decision = self.decision(outcome)
        what = (
            f"attempt {self.attempt}/{self.of} {outcome.error}"
            if outcome.status == "timed_out"
            else f"attempt {self.attempt}/{self.of} failed: {outcome.error}"
        )
        if decision.retry:
            return self.handle_retry(what, report)
        return Handled(
            level=logging.ERROR,
            message="%s; %s",
            args=(what, decision.why),
            event=report.status,
            result=SiteAttemptFailed(report, retryable=False),
        )

    def decision(self, outcome: AttemptOutcome) -> RetryDecision:
        """Whether this failed attempt is retried (`flows.engine.outcomes.retry_decision`)."""
        return retry_decision(
            outcome.status,
            outcome.exit_code,
            self.attempt,
            self.of,
            self.config.non_retryable_exit_codes,
            cause=outcome.cause,
            non_retryable_errors=self.config.non_retryable_error_patterns(),
        )

    def handle_retry(self, what: str, report: SiteReport) -> Handled:
        """Another attempt follows (Prefect schedules it): the site is not finished."""
        self.run.retrying[self.site] = report  # what a stop in the retry delay reports
        config = self.config
        delay = retry_delays(
            config.async_settings.retry_backoff, config.retry_delay, config.retry_max_delay, self.of
        )[self.attempt - 1]
        then = f"retrying in ~{delay:g}s" if delay else "retrying now"
        return Handled(
            final=False,
            level=logging.WARNING,
            message="%s; %s",
            args=(what, then),
            event="retrying",
            result=SiteAttemptFailed(report, retryable=True),
        )

    def handle_no_slot(self, exc: SlotError) -> Handled:
        """The API kept failing (api_patience) or the limit is gone: retrying can't help."""
        report = SiteReport(
            self.site, "failed", self.attempt - 1, None, 0.0, str(exc), kind="no slot"
        )
        return Handled(
            level=logging.ERROR,
            message="no slot: %s",
            args=(exc,),
            event="failed",
            result=SiteAttemptFailed(report, retryable=False),
        )

    def handle_cancelled(
        self,
        attempts: int,
        duration_s: float = 0.0,
        stderr_tail: list[str] | None = None,
        usage: list[dict[str, Any]] | None = None,
    ) -> Handled:
        """The flow run is stopping (Ctrl-C, SIGTERM): this site ends Cancelled, not Failed,
        with its report as the state's data; a pipeline it was running has been stopped."""
        reason = self.run.stop_reason or self.run.halt_reason or "the flow run is stopping"
        report = SiteReport(
            self.site,
            "cancelled",
            attempts,
            None,
            duration_s,
            reason,
            stderr_tail=stderr_tail or [],
        )
        with_usage(report, usage or [])
        return Handled(
            level=logging.WARNING,
            message="cancelled: %s",
            args=(reason,),
            event="failed",
            result=Cancelled(message=reason, data=_report_data(report)),
        )

    def end(self, handled: Handled) -> dict[str, Any] | State[Any]:
        """The one place a site is finished: every final outcome finishes it exactly once
        (before its log line, so a waiting site gets the slot order at once); a site that
        will retry is not. Then the log line, then the task run's result or exception."""
        if handled.final:
            self.run.pool.site_finished(self.site)
        if handled.message is not None:
            self.logger.log(
                handled.level, handled.message, *handled.args, extra={SITE_EVENT: handled.event}
            )
        if isinstance(handled.result, BaseException):
            raise handled.result
        return handled.result


def configured_task(
    plan: RunPlan, retry_count: int | None = None
) -> Task[..., dict[str, Any] | State[Any]]:
    """`run_site` with the plan's retries (`retry_count` attempts: a site's own, else the
    config's), delays, jitter and tag.

    No `timeout_seconds`: our runner enforces the per-attempt timeout by stopping
    the process group. For a sync task in a worker thread, Prefect's timeout
    (`cancel_sync_after`) starts a watcher thread per task run that raises
    CancelledError into the task's thread with `PyThreadState_SetAsyncExc`; that
    lands only between two Python bytecodes, never inside a blocking call, and the
    watcher threads cost one thread per running site.
    """
    config = plan.config
    attempts = retry_count or config.retry_count
    return run_site.with_options(
        tags={config.concurrency_tag},
        retries=attempts - 1,
        retry_delay_seconds=retry_delays(
            config.async_settings.retry_backoff,
            config.retry_delay,
            config.retry_max_delay,
            attempts,
        )
        or 0,
        retry_jitter_factor=config.retry_jitter if config.retry_jitter > 0 else NotSet,
    )


def _submitted(runner: TaskRunner[Any], job: SiteJob) -> Iterator[tuple[str, PrefectFuture[Any]]]:
    """One `run_site` task run per site, submitted in the job's start order (`job.plan.sites`),
    each with its own site's retries (one task per distinct `retry_count`) and its own share
    of the job (`SiteJob.for_site`)."""
    tasks: dict[int, Task[..., dict[str, Any] | State[Any]]] = {}
    for site in job.plan.sites:
        count = job.plan.site(site).retry_count
        if count not in tasks:
            tasks[count] = configured_task(job.plan, count)
        # No upstream task runs: empty dependencies, as `runner.map` passes its own, so
        # Prefect doesn't walk the parameters for each one.
        parameters = {"site": site, "job": job.for_site(site)}
        yield site, runner.submit(cast(Any, tasks[count]), parameters, dependencies={})


def sites_as_they_end(
    runner: TaskRunner[Any], job: SiteJob, given_up: Callable[[], bool] = lambda: False
) -> Iterator[tuple[str, PrefectFuture[Any]]]:
    """Submit every site's task run (`_submitted`) and yield `(site, future)` as each ends,
    while the rest are still being submitted too. No future is held past its yield: a Dask
    scheduler keeps a task (its parameters, its result) while the flow holds its future, and
    a night's first sites end long before its last are submitted. Once `given_up()` says so
    (the run stopped a while ago), the sites not ended are yielded as they are, not done."""
    ended: queue.SimpleQueue[UUID] = queue.SimpleQueue()
    pending: dict[UUID, tuple[str, PrefectFuture[Any]]] = {}

    def on_end(future: PrefectFuture[Any]) -> None:
        ended.put(future.task_run_id)

    for site, future in _submitted(runner, job):
        pending[future.task_run_id] = (site, future)
        future.add_done_callback(on_end)
        del future  # `pending` holds it until it ends
        while True:
            try:
                done = ended.get_nowait()
            except queue.Empty:
                break
            yield pending.pop(done)
    while pending:
        try:
            yield pending.pop(ended.get(timeout=0.25))
        except queue.Empty:
            if given_up():  # the run stopped: what has not ended (a retry delay) is not waited for
                yield from list(pending.values())
                return
