"""The `site-pipeline` flow: run every site's pipeline, capped, retried and summarised.

Entrypoint for deployments: `flows/site_pipeline.py:run_sites`.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, cast
from uuid import UUID

if __package__ in (None, ""):  # loaded by path (a deployment entrypoint): make `flows` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect import flow, unmapped
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.context import TagsContext
from prefect.futures import as_completed
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed, Failed

from flows import interrupts, report
from flows.cli.console import PROGRESS
from flows.config import RunPlan, load_plan
from flows.engine import baselines as history
from flows.engine.failure import SiteAttemptFailed
from flows.engine.logfilter import install_traceback_filter
from flows.engine.task import SiteJob, configured_task
from flows.engine.task_runners import task_runner
from flows.names import FAILURES_KEY, FLOW_NAME, PROGRESS_KEY, SUMMARY_KEY
from flows.process import holders
from flows.process.control import control_for
from flows.slots.prefect_api import ensure_limit, reclaim
from flows.slots.sharing import LocalRun, local_run
from flows.timeouts import site_timeouts


@flow(name=FLOW_NAME, persist_result=False, validate_parameters=True)
def run_sites(
    sites: list[str] | None = None,
    config_path: str | None = None,
    max_concurrent_sites: int | None = None,
    use_async: bool | None = None,
    skip: dict[str, str] | None = None,
) -> State[dict[str, Any]]:
    """Run every site's pipeline; the state's data is the summary dict (see `flows.report`).

    `sites`, `max_concurrent_sites` and `use_async` override the config file. `skip` maps
    sites that already succeeded (in the run that `--retry-failed` resumes) to a note; they
    are not run and the summary lists them as `skipped`.
    The run ends Completed when every site it ran succeeded, Cancelled when it was asked to
    stop (`flows.interrupts`), else Failed.
    """
    install_traceback_filter()
    logger = get_run_logger()
    full = load_plan(
        config_path, sites=sites, max_concurrent_sites=max_concurrent_sites, use_async=use_async
    )
    skipped = report.skipped_reports(full.sites, skip or {})
    plan = dataclasses.replace(full, sites=tuple(s for s in full.sites if s not in skipped))
    for warning in plan.warnings:
        logger.warning(warning)
    if skipped:
        logger.info("%d sites skipped: they succeeded earlier", len(skipped))
    config, total = plan.config, len(plan.sites)
    stop = interrupts.stop_request.get()
    flow_run_id = UUID(str(flow_run.get_id()))
    with get_client(sync_client=True) as client:
        logger.info(ensure_limit(client, config.concurrency_tag, plan.max_concurrent_sites))
        # Name this process on the run, so `doctor` and `--retry-failed` can tell a run
        # left Running by a dead process; and give back what dead runs here still held.
        client.update_flow_run_labels(flow_run_id, {**holders.this_process_labels()})
        for line in reclaim(client):
            logger.warning(line)
    logger.info(
        "%d sites, at most %d at once (%s), %d attempts each",
        total,
        plan.max_concurrent_sites,
        "async" if plan.use_async else "sequential",
        config.retry_count,
    )

    progress = (
        cast(
            UUID,
            create_progress_artifact(0.0, key=PROGRESS_KEY, description="sites done"),
        )
        if config.async_settings.progress_reporting
        else None
    )
    reports: dict[str, report.SiteReport] = {}
    progress_at, failed = 0.0, 0
    on_progress = report.progress_callback.get()
    checks, learned = config.result_checks, config.learned_timeout
    tables = history.summary_tables() if checks or learned else []  # one query for both
    durations = history.success_durations(plan.sites, learned.window, tables) if learned else {}
    job = SiteJob(
        plan,
        flow_run_id,
        tuple(sorted({config.concurrency_tag, *(TagsContext.get().current_tags or ())})),
        history.check_values(checks.field, plan.sites, checks.window, tables) if checks else {},
        site_timeouts(plan.sites, durations, learned, config.timeout),
    )
    if learned:
        logger.info(
            "learned timeouts: %d of %d sites have enough history (%d successful runs)",
            sum(len(durations.get(site, ())) >= learned.min_runs for site in plan.sites),
            total,
            learned.min_runs,
        )
    # Task runs in this process share one slot pool, handed out in list order and filled up
    # front; on Dask each worker makes its own (flows.engine.task.local_run).
    in_process = config.task_runner.kind == "threads"
    with (
        local_run(job, prefetch=plan.max_concurrent_sites, in_flow=True)
        if in_process
        else nullcontext() as run,
        task_runner(plan) as runner,
        _stopping_on(stop, run, plan, str(flow_run_id)),
    ):
        futures = runner.map(
            cast(Any, configured_task(plan)), {"site": list(plan.sites), "job": unmapped(job)}
        )
        site_of = {id(future): site for future, site in zip(futures, plan.sites, strict=True)}
        try:
            for future in as_completed(list(futures)):
                site = site_of[id(future)]
                future.wait()
                reports[site] = _site_report(site, future.state)
                failed += reports[site].status != "succeeded"
                if on_progress is not None:
                    on_progress(len(reports), total, failed)
                if progress is not None:
                    logger.info(
                        report.progress_line(len(reports), total, failed),
                        extra={PROGRESS: True},
                    )
                    # At most once a second: each update is a blocking API call.
                    now = time.monotonic()
                    if now - progress_at >= 1 or len(reports) == total:
                        progress_at = now
                        update_progress_artifact(progress, 100.0 * len(reports) / total)
        except BaseException:
            # Cancelled or crashing: stop this run's pipelines now, before the task runner
            # waits for its threads, so none outlives the flow run. (On Dask, closing a
            # local cluster ends its workers, and their reapers stop their pipelines.)
            if run is not None:
                run.stopping.set()
            control_for(config.process_control).stop_all(
                config.kill_grace_seconds, owner=str(flow_run_id)
            )
            raise

    ordered = [skipped.get(site) or reports[site] for site in full.sites]
    stopped = stop is not None and stop.requested
    summary = report.build_summary(
        str(flow_run_id), ordered, state="Cancelled" if stopped else None
    )
    create_table_artifact(
        report.table_rows(ordered), key=SUMMARY_KEY, description="one row per site"
    )
    failures = (
        report.failures_markdown(ordered) if config.async_settings.error_aggregation else None
    )
    if failures:
        create_markdown_artifact(
            failures, key=FAILURES_KEY, description="failures by kind"
        )
    warned = report.warning_message(ordered)
    if warned:
        logger.warning(warned)
    message = report.failure_message(ordered)
    if stopped:
        assert stop is not None  # noqa: S101  (for mypy: stopped implies it)
        reason = f"{stop.reason}: {message}" if message else str(stop.reason)
        logger.warning(reason)
        return Cancelled(message=reason, data=summary)
    if message:
        logger.error(message)
        return Failed(message="; ".join(filter(None, [message, warned])), data=summary)
    done = f"all {total} sites succeeded"
    return Completed(message=f"{done}; {warned}" if warned else done, data=summary)


@contextmanager
def _stopping_on(
    stop: interrupts.StopRequest | None, run: LocalRun | None, plan: RunPlan, owner: str
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
                control_for(plan.config.process_control).stop_all(
                    plan.config.kill_grace_seconds, owner=owner
                )
                done.wait(0.5)

    watcher = threading.Thread(target=watch, name="site-pipeline-stop", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _site_report(site: str, state: State[Any]) -> report.SiteReport:
    """The site's final report, from its task run's final state."""
    value = state.result(raise_on_failure=False) if state.is_final() else None
    if isinstance(value, SiteAttemptFailed):
        return value.report
    if isinstance(value, dict) and (state.is_completed() or state.is_cancelled()):
        return report.SiteReport(**value)
    status: report.SiteStatus = "failed"
    if state.is_cancelled() or not state.is_final():
        status = "cancelled"
    error = state.message or (repr(value) if value is not None else None)
    return report.SiteReport(site, status, 0, None, 0.0, error)


if __name__ == "__main__":
    run_sites()
