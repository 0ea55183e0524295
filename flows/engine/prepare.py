"""Before the sites run: the plan, the concurrency limit, and the `SiteJob` every task run gets.

Each step logs what it found on the flow run's logger, in the order a reader of the run's
log expects: the plan's warnings and skipped sites, the limit and what was reclaimed, the
run's shape, then the learned timeouts. The one history query (`flows.engine.baselines`)
happens here: it gives the start order, and what the run's end needs is handed back with the
job (`PreparedJob.earlier`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.context import TagsContext

from flows import health, report
from flows.config import RunPlan, group_limit_name, load_plan
from flows.context import RunContext
from flows.engine import baselines
from flows.engine.site_job import SiteJob
from flows.process import holders
from flows.slots.prefect_api import ensure_limit
from flows.slots.reclaim import reclaim
from flows.start_order import history_window, plan_order
from flows.timeouts import site_timeout

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
    sites: Sequence[str | dict[str, Any]] | None,
    max_concurrent_sites: int | None,
    use_async: bool | None,
    skip: dict[str, str] | None,
) -> PlannedRun:
    """The plan (the caller's, `RunContext.plan`, else loaded: the flow's parameters override
    the config file), without the sites in `skip`; logs the plan's warnings and how many
    sites were skipped."""
    full = RunContext.get().plan or load_plan(
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
        for group, cap in plan.group_limits.items():  # each group's own limit (issue 21)
            logger.info(ensure_limit(client, group_limit_name(config.concurrency_tag, group), cap))
        # Name this process on the run, so `doctor` and `--retry-failed` can tell a run
        # left Running by a dead process; and give back what dead runs here still held.
        client.update_flow_run_labels(flow_run_id, {**holders.this_process_labels()})
        names = [group_limit_name(config.concurrency_tag, g) for g in plan.group_limits]
        for line in reclaim(client, names=[config.concurrency_tag, *names]):
            logger.warning(line)
    logger.info(
        "%d sites, at most %d at once (%s), %d attempts each",
        len(plan.sites),
        plan.max_concurrent_sites,
        "async" if plan.use_async else "sequential",
        config.retry_count,
    )


class PreparedJob(NamedTuple):
    """What `site_job` prepared: the task runs' `job` (its plan's sites in start order), and
    the earlier runs' summary rows (`flows.health.compact`, newest run first) that the run's
    end needs for the site health and the streaks; those stay in the flow's process."""

    job: SiteJob
    earlier: list[list[health.Row]]


def site_job(logger: RunLogger, plan: RunPlan, flow_run_id: UUID) -> PreparedJob:
    """The task runs' shared parameter: the plan (its sites in start order), the run, its
    tags, and what earlier runs tell (the start order, result check baselines, learned
    timeouts, and for the run's end each site's health: one query for all)."""
    config = plan.config
    checks, learned = config.result_checks, config.learned_timeout
    tables = baselines.summary_tables()
    durations = baselines.success_durations(plan.sites, history_window(plan), tables)
    order = plan_order(plan, durations)
    logger.info(order.line)
    job = SiteJob(
        dataclasses.replace(plan, sites=order.sites),
        flow_run_id,
        tuple(sorted({config.concurrency_tag, *(TagsContext.get().current_tags or ())})),
        baselines.check_values(checks.field, plan.sites, checks.window, tables) if checks else {},
        {
            site: site_timeout(durations.get(site, ()), learned, plan.site(site).timeout)
            for site in plan.sites
        },
    )
    if learned:
        logger.info(
            "learned timeouts: %d of %d sites have enough history (%d successful runs)",
            sum(len(durations.get(site, ())) >= learned.min_runs for site in plan.sites),
            len(plan.sites),
            learned.min_runs,
        )
    return PreparedJob(job, health.compact(tables))
