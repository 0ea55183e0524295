"""The `run_site` task: one attempt of one site's pipeline per task run attempt.

Prefect drives the retries (`retries`, `retry_delay_seconds`,
`retry_jitter_factor`, `retry_condition_fn`); this task runs one attempt, holding
a concurrency slot only while the pipeline process runs.

The task is self-contained: its `SiteJob` parameter carries the plan and the flow run,
so any process can run it (a thread of the flow's process, or a Dask worker). Each
process shares one slot pool per flow run (`flows.slots.sharing`).
"""

from __future__ import annotations

import os
from typing import Any
from uuid import UUID

from prefect import Task, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.runtime import task_run as current_task_run
from prefect.states import Cancelled
from prefect.utilities.annotations import NotSet

from flows.backoff import retry_delays
from flows.checks import check_result
from flows.cli.console import PIPELINE_OUTPUT, SITE_EVENT
from flows.config import RunPlan, build_argv, site_output_dir
from flows.engine.failure import SiteAttemptFailed
from flows.engine.logfilter import install_traceback_filter
from flows.process.attempt import run_attempt
from flows.process.control import control_for
from flows.report import SiteReport
from flows.slots.pool import SlotError
from flows.slots.sharing import LocalRun, local_run
from flows.timeouts import SiteTimeout, site_timeout


class SiteJob:
    """What every `run_site` task run of one flow run needs, whichever process runs it.

    A plain class on purpose: Prefect walks the dataclasses and models in a task's
    parameters once per task run, and this holds the whole plan.
    """

    __slots__ = ("check_history", "flow_run_id", "plan", "tags", "timeouts")

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

    def timeout(self, site: str) -> SiteTimeout:
        return self.timeouts.get(site) or site_timeout((), None, self.plan.config.timeout)


def _should_retry(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's retry_condition_fn: no retry for non-retryable exit codes or start errors."""
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
    plan, config = job.plan, job.plan.config
    logger = get_run_logger()
    attempt = max(1, int(current_task_run.run_count))
    try:
        out_dir = site_output_dir(plan.output_dir, site)
        out_dir.mkdir(parents=True, exist_ok=True)
    except BaseException:
        run.pool.site_finished(site)  # it will never ask for a slot: don't keep others waiting
        raise
    argv = build_argv(config, site, attempt, out_dir)
    env = {
        **os.environ,
        **config.env,
        "SITE": site,
        "SITE_ATTEMPT": str(attempt),
        "SITE_OUTPUT_DIR": str(out_dir),
        "SITE_FLOW_RUN_ID": str(job.flow_run_id),
    }
    of = config.retry_count
    limit = job.timeout(site)
    if run.stopping.is_set():
        return _cancelled(site, attempt - 1, run)
    try:
        with run.pool.slot(site):
            if run.stopping.is_set():
                outcome = None
            else:
                logger.info(
                    "attempt %d/%d started; %s",
                    attempt,
                    of,
                    limit.why,
                    extra={SITE_EVENT: "started"},
                )
                logger.debug("argv: %s", argv)
                outcome = run_attempt(
                    argv,
                    cwd=plan.working_dir,
                    env=env,
                    timeout=limit.seconds,
                    kill_grace=config.kill_grace_seconds,
                    log=lambda line: logger.info(line, extra={PIPELINE_OUTPUT: True}),
                    max_log_lines=config.max_log_lines,
                    owner=str(job.flow_run_id),
                    control=control_for(config.process_control),
                )
    except SlotError as exc:
        if run.stopping.is_set():
            return _cancelled(site, attempt - 1, run)
        # The API kept failing (api_patience) or the limit is gone: retrying can't help.
        run.pool.site_finished(site)
        logger.error("no slot: %s", exc, extra={SITE_EVENT: "failed"})
        report = SiteReport(site, "failed", attempt - 1, None, 0.0, str(exc), kind="no slot")
        raise SiteAttemptFailed(report, retryable=False) from None
    if outcome is None:
        return _cancelled(site, attempt - 1, run)
    if run.stopping.is_set():
        return _cancelled(site, attempt, run, outcome.duration_s, outcome.stderr_tail)

    status = "failed" if outcome.status == "not_started" else outcome.status
    report = SiteReport(
        site=site,
        status=status,
        attempts=attempt,
        exit_code=outcome.exit_code,
        duration_s=outcome.duration_s,
        error=outcome.error,
        result=outcome.result,
        stderr_tail=outcome.stderr_tail,
        timeout_s=limit.seconds,
    )
    checks = config.result_checks
    if outcome.status == "succeeded" and checks is not None:
        verdict = check_result(outcome.result, checks, job.check_history.get(site, ()))
        report.check = verdict.to_json(checks.field)
        if not verdict.ok and checks.on_fail == "fail":
            # The scraper ran fine and the data is what it is: retrying can't help.
            run.pool.site_finished(site)
            report.status, report.kind, report.error = "failed", "result check", verdict.reason
            logger.error(
                "attempt %d/%d: result check failed: %s; not retried",
                attempt,
                of,
                verdict.reason,
                extra={SITE_EVENT: "failed"},
            )
            raise SiteAttemptFailed(report, retryable=False)
        if not verdict.ok:
            logger.warning("result check: %s (on_fail: warn; the site succeeds)", verdict.reason)
    if outcome.status == "succeeded":
        run.pool.site_finished(site)
        logger.info(
            "attempt %d/%d succeeded in %.1fs",
            attempt,
            of,
            outcome.duration_s,
            extra={SITE_EVENT: "succeeded"},
        )
        return report.to_json() | {"stderr_tail": report.stderr_tail}

    retryable = outcome.status != "not_started" and (
        outcome.exit_code not in config.non_retryable_exit_codes
    )
    what = (
        f"attempt {attempt}/{of} {outcome.error}"
        if outcome.status == "timed_out"
        else f"attempt {attempt}/{of} failed: {outcome.error}"
    )
    if not retryable or attempt >= of:
        run.pool.site_finished(site)
        if retryable:
            why = "no retries left"
        elif outcome.status == "not_started":
            why = "not retried: the command can't start"
        else:
            why = f"not retried: exit code {outcome.exit_code} is in non_retryable_exit_codes"
        logger.error("%s; %s", what, why, extra={SITE_EVENT: status})
    else:
        delay = retry_delays(
            config.async_settings.retry_backoff, config.retry_delay, config.retry_max_delay, of
        )[attempt - 1]
        then = f"retrying in ~{delay:g}s" if delay else "retrying now"
        logger.warning("%s; %s", what, then, extra={SITE_EVENT: "retrying"})
    raise SiteAttemptFailed(report, retryable=retryable)


def _cancelled(
    site: str,
    attempts: int,
    run: LocalRun,
    duration_s: float = 0.0,
    stderr_tail: list[str] | None = None,
) -> State[Any]:
    """The flow run is stopping (Ctrl-C, SIGTERM): this site ends Cancelled, not Failed, with
    its report as the state's data; a pipeline it was running has been stopped."""
    run.pool.site_finished(site)
    reason = run.stop_reason or "the flow run is stopping"
    get_run_logger().warning("cancelled: %s", reason, extra={SITE_EVENT: "failed"})
    report = SiteReport(
        site, "cancelled", attempts, None, duration_s, reason, stderr_tail=stderr_tail or []
    )
    return Cancelled(message=reason, data=report.to_json() | {"stderr_tail": report.stderr_tail})


def configured_task(plan: RunPlan) -> Task[..., dict[str, Any] | State[Any]]:
    """`run_site` with the plan's retries, delays, jitter and tag.

    No `timeout_seconds`: our runner enforces the per-attempt timeout by stopping
    the process group. For a sync task in a worker thread, Prefect's timeout
    (`cancel_sync_after`) starts a watcher thread per task run that raises
    CancelledError into the task's thread with `PyThreadState_SetAsyncExc`; that
    lands only between two Python bytecodes, never inside a blocking call, and the
    watcher threads cost one thread per running site.
    """
    config = plan.config
    return run_site.with_options(
        tags={config.concurrency_tag},
        retries=config.retry_count - 1,
        retry_delay_seconds=retry_delays(
            config.async_settings.retry_backoff,
            config.retry_delay,
            config.retry_max_delay,
            config.retry_count,
        )
        or 0,
        retry_jitter_factor=config.retry_jitter if config.retry_jitter > 0 else NotSet,
    )
