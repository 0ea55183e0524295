"""The `site-pipeline` flow: run every site's pipeline, capped, retried and summarised.

Entrypoint for deployments: `flows/site_pipeline.py:run_sites`. The steps it is made of
live in `flows.engine`: `prepare` (plan, limit, job), `running` (the task runner and what
surrounds it), `progress`, and `finish` (artifacts and the final state).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from uuid import UUID

if __package__ in (None, ""):  # loaded by path (a deployment entrypoint): make `flows` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from flows.context import RunContext
from flows.engine.finish import finish_run
from flows.engine.logfilter import install_traceback_filter
from flows.engine.prepare import claim_limit, plan_run, site_job
from flows.engine.progress import ProgressReporter
from flows.engine.running import running_sites, site_report, stopped_for, stopped_report
from flows.engine.submission import sites_as_they_end
from flows.names import FLOW_NAME
from flows.report import SiteReport


@flow(name=FLOW_NAME, persist_result=False, validate_parameters=True)
def run_sites(
    sites: list[str | dict[str, Any]] | None = None,
    config_path: str | None = None,
    max_concurrent_sites: int | None = None,
    use_async: bool | None = None,
    skip: dict[str, str] | None = None,
) -> State[dict[str, Any]]:
    """Run every site's pipeline; the state's data is the summary dict (see `flows.report`).

    `sites`, `max_concurrent_sites` and `use_async` override the config file; a `sites`
    entry is a name or a mapping with its own settings, as in the config. `skip` maps
    sites that already succeeded (in the run that `--retry-failed` resumes) to a note; they
    are not run and the summary lists them as `skipped`.
    The run ends Completed when every site it ran succeeded, Cancelled when it was asked to
    stop (`flows.context.RunContext`), else Failed (a halt, `pipeline.halt`, is named).
    """
    install_traceback_filter()
    logger = get_run_logger()
    context = RunContext.get()  # the caller's stop request, progress callback, cluster
    full, plan, skipped = plan_run(
        logger, config_path, sites, max_concurrent_sites, use_async, skip
    )
    flow_run_id = UUID(str(flow_run.get_id()))
    claim_limit(logger, plan, flow_run_id)
    progress = ProgressReporter.start(
        len(plan.sites), logger, context.on_progress, plan.config.async_settings.progress_reporting
    )
    job, earlier = site_job(logger, plan, flow_run_id)  # job.plan.sites: in start order

    reports: dict[str, SiteReport] = {}
    given_up = stopped_for(context.stop, plan.config.kill_grace_seconds + 2)
    with running_sites(job, context.stop, context.cluster) as (runner, halt):
        for site, future in sites_as_they_end(runner, job, given_up):
            if given_up():  # the run stopped; this one sleeps in a retry delay
                ended = stopped_report(site, future.state, halt.run)
            else:
                future.wait()
                ended = site_report(site, future.state)
            reports[site] = progress.site_done(halt.seen(ended))

    ordered = [skipped.get(site) or reports[site] for site in full.sites]
    return finish_run(logger, plan, str(flow_run_id), ordered, context.stop, halt.reason, earlier)


if __name__ == "__main__":
    run_sites()
