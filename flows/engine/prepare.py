"""Before the sites run: the plan, the concurrency limit, and the `SiteJob` every task run gets.

Each step logs what it found on the flow run's logger, in the order a reader of the run's
log expects: the plan's warnings and skipped sites, the limit and what was reclaimed, the
run's shape, then the learned timeouts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.context import TagsContext

from flows import report
from flows.config import RunPlan, load_plan
from flows.engine import baselines
from flows.engine.task import SiteJob
from flows.process import holders
from flows.slots.prefect_api import ensure_limit, reclaim
from flows.timeouts import site_timeouts

RunLogger = logging.Logger | logging.LoggerAdapter[logging.Logger]
"""What `prefect.get_run_logger()` returns: the flow run's logger, which every step logs to."""


class PlannedRun(NamedTuple):
    """The whole plan (`full`, for the summary's order), the part to run, and the skipped."""

    full: RunPlan
    plan: RunPlan
    skipped: dict[str, report.SiteReport]


def plan_run(
    logger: RunLogger,
    config_path: str | None,
    sites: list[str] | None,
    max_concurrent_sites: int | None,
    use_async: bool | None,
    skip: dict[str, str] | None,
) -> PlannedRun:
    """Load the plan (the flow's parameters override the config file) and leave out the
    sites in `skip`; logs the plan's warnings and how many sites were skipped."""
    full = load_plan(
        config_path, sites=sites, max_concurrent_sites=max_concurrent_sites, use_async=use_async
    )
    skipped = report.skipped_reports(full.sites, skip or {})
    plan = dataclasses.replace(full, sites=tuple(s for s in full.sites if s not in skipped))
    for warning in plan.warnings:
        logger.warning(warning)
    if skipped:
        logger.info("%d sites skipped: they succeeded earlier", len(skipped))
    return PlannedRun(full, plan, skipped)


def claim_limit(logger: RunLogger, plan: RunPlan, flow_run_id: UUID) -> None:
    """Make sure the global concurrency limit exists with the plan's cap, name this process
    on the flow run, and give back the slots that dead runs here still held; then log the
    run's shape."""
    config = plan.config
    with get_client(sync_client=True) as client:
        logger.info(ensure_limit(client, config.concurrency_tag, plan.max_concurrent_sites))
        # Name this process on the run, so `doctor` and `--retry-failed` can tell a run
        # left Running by a dead process; and give back what dead runs here still held.
        client.update_flow_run_labels(flow_run_id, {**holders.this_process_labels()})
        for line in reclaim(client):
            logger.warning(line)
    logger.info(
        "%d sites, at most %d at once (%s), %d attempts each",
        len(plan.sites),
        plan.max_concurrent_sites,
        "async" if plan.use_async else "sequential",
        config.retry_count,
    )


def site_job(logger: RunLogger, plan: RunPlan, flow_run_id: UUID) -> SiteJob:
    """The task runs' shared parameter: the plan, the run, its tags, and what earlier runs
    tell (result check baselines, learned timeouts: one query for both)."""
    config = plan.config
    checks, learned = config.result_checks, config.learned_timeout
    tables = baselines.summary_tables() if checks or learned else []
    durations = baselines.success_durations(plan.sites, learned.window, tables) if learned else {}
    job = SiteJob(
        plan,
        flow_run_id,
        tuple(sorted({config.concurrency_tag, *(TagsContext.get().current_tags or ())})),
        baselines.check_values(checks.field, plan.sites, checks.window, tables) if checks else {},
        site_timeouts(plan.sites, durations, learned, config.timeout),
    )
    if learned:
        logger.info(
            "learned timeouts: %d of %d sites have enough history (%d successful runs)",
            sum(len(durations.get(site, ())) >= learned.min_runs for site in plan.sites),
            len(plan.sites),
            learned.min_runs,
        )
    return job
