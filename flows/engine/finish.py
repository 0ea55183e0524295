"""After the sites ran: the run's artifacts and its final state.

- the summary table (`SUMMARY_KEY`, one row per site);
- the failures grouped by kind (`FAILURES_KEY`, with `async_settings.error_aggregation`);
- the site health (`HEALTH_KEY`, every run): each site's last outcomes, durations and
  records, and its failure streak (`flows.health`), from the history that `prepare` read
  and this run;
- the result check warnings, logged;
- the metrics (`pipeline.metrics`, `flows.engine.metrics_export`), every run;
- the state: Cancelled when the caller asked to stop, Failed when a site failed, else
  Completed; its data is the summary dict (`flows.report.build_summary`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import State
from prefect.states import Cancelled, Completed, Failed

from flows import failure_causes, health, report
from flows.config import RunPlan
from flows.engine.metrics_export import export_metrics
from flows.engine.prepare import RunLogger
from flows.interrupts import StopRequest
from flows.names import FAILURES_KEY, HEALTH_KEY, SUMMARY_KEY
from flows.slots.prefect_api import API_ERRORS, describe_api_error


def publish_artifacts(
    logger: RunLogger,
    plan: RunPlan,
    reports: Sequence[report.SiteReport],
    earlier: Sequence[Sequence[Mapping[str, Any]]] = (),
) -> dict[str, int]:
    """The summary table, the site health (this run and the `earlier` runs' summary rows,
    newest first), and the failures by kind when the plan aggregates errors. Returns each
    site's failure streak, this run included. An artifact the API fails to take (a backend
    of the server down) is a warning: the sites ran, and the run still ends with its
    summary."""
    rows = report.table_rows(reports)
    _publish(logger, SUMMARY_KEY, create_table_artifact, rows, description="one row per site")
    field = plan.config.result_checks.field if plan.config.result_checks else None
    healths = health.health_table([r.site for r in reports], [rows, *earlier], field is not None)
    _publish(
        logger,
        HEALTH_KEY,
        create_markdown_artifact,
        health.health_markdown(healths, field),
        description="each site's last runs and failure streak",
    )
    aggregated = plan.config.async_settings.error_aggregation
    failures = failure_causes.failures_markdown(reports) if aggregated else None
    if failures:
        _publish(
            logger, FAILURES_KEY, create_markdown_artifact, failures, description="failures by kind"
        )
    return {h.site: h.streak for h in healths}


def _publish(
    logger: RunLogger, key: str, create: Callable[..., object], body: Any, description: str
) -> None:
    try:
        create(body, key=key, description=description)
    except API_ERRORS as exc:
        logger.warning("could not publish the %s artifact: %s", key, describe_api_error(exc))


def finish_run(
    logger: RunLogger,
    plan: RunPlan,
    flow_run_id: str,
    reports: Sequence[report.SiteReport],
    stop: StopRequest | None,
    halted: str | None = None,
    earlier: Sequence[Sequence[Mapping[str, Any]]] = (),
) -> State[dict[str, Any]]:
    """Publish the artifacts and return the final state, its data the summary; `reports`
    are every site's, skipped ones included, in the config's order. `halted`: why the run
    halted (`pipeline.halt`): the run ends Failed, its message led by the halt. `earlier`: the
    earlier runs' summary rows (`prepare.PreparedJob.earlier`), for the health and streaks."""
    stopped = stop is not None and stop.requested
    summary = report.build_summary(flow_run_id, reports, state="Cancelled" if stopped else None)
    streaks = publish_artifacts(logger, plan, reports, earlier)
    export_metrics(logger, plan, summary, streaks)  # pipeline.metrics; never raises
    warned = report.warning_message(reports)
    if warned:
        logger.warning(warned)
    message = failure_causes.failure_message(reports, streaks=streaks)
    if stop is not None and stopped:
        reason = f"{stop.reason}: {message}" if message else str(stop.reason)
        logger.warning(reason)
        return Cancelled(message=reason, data=summary)
    if halted:
        reason = f"{halted}: {message}" if message else halted
        logger.error(reason)
        return Failed(message="; ".join(filter(None, [reason, warned])), data=summary)
    if message:
        logger.error(message)
        return Failed(message="; ".join(filter(None, [message, warned])), data=summary)
    done = f"all {len(plan.sites)} sites succeeded"
    return Completed(message=f"{done}; {warned}" if warned else done, data=summary)
