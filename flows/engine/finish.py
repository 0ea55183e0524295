"""After the sites ran: the run's artifacts and its final state.

- the summary table (`SUMMARY_KEY`, one row per site);
- the failures grouped by kind (`FAILURES_KEY`, with `async_settings.error_aggregation`);
- the result check warnings, logged;
- the state: Cancelled when the caller asked to stop, Failed when a site failed, else
  Completed; its data is the summary dict (`flows.report.build_summary`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import State
from prefect.states import Cancelled, Completed, Failed

from flows import report
from flows.config import RunPlan
from flows.engine.prepare import RunLogger
from flows.interrupts import StopRequest
from flows.names import FAILURES_KEY, SUMMARY_KEY


def publish_artifacts(plan: RunPlan, reports: Sequence[report.SiteReport]) -> None:
    """The summary table, and the failures by kind when the plan aggregates errors."""
    create_table_artifact(
        report.table_rows(reports), key=SUMMARY_KEY, description="one row per site"
    )
    failures = (
        report.failures_markdown(reports) if plan.config.async_settings.error_aggregation else None
    )
    if failures:
        create_markdown_artifact(failures, key=FAILURES_KEY, description="failures by kind")


def finish_run(
    logger: RunLogger,
    plan: RunPlan,
    flow_run_id: str,
    reports: Sequence[report.SiteReport],
    stop: StopRequest | None,
) -> State[dict[str, Any]]:
    """Publish the artifacts and return the final state, its data the summary; `reports`
    are every site's, skipped ones included, in the config's order."""
    stopped = stop is not None and stop.requested
    summary = report.build_summary(flow_run_id, reports, state="Cancelled" if stopped else None)
    publish_artifacts(plan, reports)
    warned = report.warning_message(reports)
    if warned:
        logger.warning(warned)
    message = report.failure_message(reports)
    if stop is not None and stopped:
        reason = f"{stop.reason}: {message}" if message else str(stop.reason)
        logger.warning(reason)
        return Cancelled(message=reason, data=summary)
    if message:
        logger.error(message)
        return Failed(message="; ".join(filter(None, [message, warned])), data=summary)
    done = f"all {len(plan.sites)} sites succeeded"
    return Completed(message=f"{done}; {warned}" if warned else done, data=summary)
