"""The `run_site` task: one attempt of one site's pipeline per task run attempt.

Prefect drives the retries (`retries`, `retry_delay_seconds`,
`retry_jitter_factor`, `retry_condition_fn`); this task runs one attempt, holding
a concurrency slot only while the pipeline process runs.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.logging import get_run_logger
from prefect.runtime import task_run as current_task_run
from prefect.utilities.annotations import NotSet

from flows.backoff import retry_delays
from flows.config import RunPlan, build_argv, site_output_dir
from flows.report import SiteReport
from flows.runner import run_attempt
from flows.slots import SlotError, SlotPool


@dataclass
class SiteRun:
    """What the tasks of one flow run share, found by flow run id."""

    plan: RunPlan
    pool: SlotPool
    flow_run_id: UUID
    stopping: threading.Event = field(default_factory=threading.Event)


_active: dict[str, SiteRun] = {}
_active_lock = threading.Lock()


def register(run: SiteRun) -> str:
    key = str(run.flow_run_id)
    with _active_lock:
        _active[key] = run
    return key


def unregister(key: str) -> None:
    with _active_lock:
        _active.pop(key, None)


class SiteAttemptFailed(Exception):
    """An attempt did not succeed. `report` is the site's outcome so far."""

    def __init__(self, report: SiteReport, retryable: bool) -> None:
        self.report = report
        self.retryable = retryable
        super().__init__(
            f"{report.site}: attempt {report.attempts} {report.status}: {report.error}"
        )


def _should_retry(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's retry_condition_fn: no retry for non-retryable exit codes or start errors."""
    error = state.data
    return not isinstance(error, SiteAttemptFailed) or error.retryable


@task(
    name="run_site",
    task_run_name="{site}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=_should_retry,
)
def run_site(site: str, run_key: str) -> dict[str, Any]:
    """Run one attempt of `site`'s pipeline. Returns its report; raises on failure."""
    with _active_lock:
        run = _active[run_key]
    plan, config = run.plan, run.plan.config
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
        "SITE_FLOW_RUN_ID": str(run.flow_run_id),
    }
    try:
        with run.pool.slot(site):
            if run.stopping.is_set():
                outcome = None
            else:
                logger.info("attempt %d of %d: %s", attempt, config.retry_count, argv)
                outcome = run_attempt(
                    argv,
                    cwd=plan.working_dir,
                    env=env,
                    timeout=config.timeout,
                    kill_grace=config.kill_grace_seconds,
                    log=logger.info,
                    max_log_lines=config.max_log_lines,
                )
    except SlotError as exc:
        # The API kept failing (api_patience) or the limit is gone: retrying can't help.
        run.pool.site_finished(site)
        report = SiteReport(site, "failed", attempt - 1, None, 0.0, str(exc), kind="no slot")
        raise SiteAttemptFailed(report, retryable=False) from None
    if outcome is None or run.stopping.is_set():
        report = SiteReport(site, "cancelled", attempt, None, 0.0, "the flow run is stopping")
        run.pool.site_finished(site)
        raise SiteAttemptFailed(report, retryable=False)

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
    )
    if outcome.status == "succeeded":
        run.pool.site_finished(site)
        return report.to_json() | {"stderr_tail": report.stderr_tail}

    retryable = outcome.status != "not_started" and (
        outcome.exit_code not in config.non_retryable_exit_codes
    )
    if not retryable or attempt >= config.retry_count:
        run.pool.site_finished(site)
    if outcome.status == "timed_out":
        logger.error("attempt %d timed out after %gs", attempt, config.timeout)
    raise SiteAttemptFailed(report, retryable=retryable)


def configured_task(plan: RunPlan) -> Task[..., dict[str, Any]]:
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
