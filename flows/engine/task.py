"""The `run_site` task: one attempt of one site's pipeline per task run attempt, and its
options (`configured_task`: the plan's retries, delays, jitter and tag).

Prefect drives the retries (`retries`, `retry_delay_seconds`,
`retry_jitter_factor`, `retry_condition_fn`); this task runs one attempt, holding
a concurrency slot only while the pipeline process runs.

The task is self-contained: its `SiteJob` parameter (`flows.engine.site_job`) carries the
plan and the flow run, so any process can run it (a thread of the flow's process, or a Dask
worker). Each process shares one slot pool per flow run (`flows.slots.sharing`).

An attempt is run by `AttemptEngine` (`flows.engine.attempt_engine`); the task runs are
submitted by `flows.engine.submission`.
"""

from __future__ import annotations

from typing import Any

from prefect import Task, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.runtime import task_run as current_task_run
from prefect.utilities.annotations import NotSet

from flows.backoff import retry_delays
from flows.config import RunPlan, site_output_dir
from flows.engine.attempt_engine import AttemptEngine, Handled
from flows.engine.failure import SiteAttemptFailed
from flows.engine.logfilter import install_traceback_filter
from flows.engine.site_job import SiteJob
from flows.report import SiteReport
from flows.slots.sharing import LocalRun, local_run


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
def run_site(site: str, job: SiteJob) -> SiteReport | State[Any]:
    """Run one attempt of `site`'s pipeline. Returns its report; raises on failure; returns
    a Cancelled state (its data the report) when the flow run is stopping."""
    install_traceback_filter()  # in whichever process runs it (the flow's, a Dask worker)
    with local_run(job) as run:
        return _attempt(site, job, run)


def _attempt(site: str, job: SiteJob, run: LocalRun) -> SiteReport | State[Any]:
    """Prepare the attempt, run it under a slot, and end it through its outcome's handler."""
    engine = AttemptEngine(site, job, run, max(1, int(current_task_run.run_count)))
    try:
        out_dir = site_output_dir(job.plan.output_dir, site)
        out_dir.mkdir(parents=True, exist_ok=True)
    except BaseException as exc:
        # It will never ask for a slot: don't keep others waiting.
        return engine.end(Handled(exc))
    return engine.end(engine.dispatch(engine.begin_run(out_dir), out_dir))


def configured_task(
    plan: RunPlan, retry_count: int | None = None
) -> Task[..., SiteReport | State[Any]]:
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
