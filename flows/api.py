"""Run the site pipeline from Python: `run_pipeline(sites) -> dict[str, bool]`, sync and async.

The team's executor API, on the `site-pipeline` flow::

    from flows import run_pipeline, run_pipeline_async

    results = run_pipeline(["a.com", "b.com"])                 # {"a.com": True, "b.com": False}
    results = run_pipeline(sites, use_async=False)             # the old one-at-a-time loop
    results = await run_pipeline_async(sites, on_progress=print)   # from async code

A failed site is `False`, never an exception. A bad config, site name or argument raises
`ConfigError` (its message is the same `key = value: expected` lines the CLI prints) before
anything runs. A flow run that ends with no summary (it crashed) raises `PipelineRunError`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

from flows.config import ConfigError, RunPlan, load_plan
from flows.context import ProgressFn, RunContext
from flows.dask_cluster import LocalDaskCluster, local_cluster
from flows.interrupts import StopRequest
from flows.report import as_bools, skipped_reports


class PipelineRunError(RuntimeError):
    """The flow run ended without a summary (it crashed or was cancelled before it made one)."""


def run_pipeline_summary(
    sites: Sequence[str | Mapping[str, Any]] | None = None,
    *,
    config_path: str | os.PathLike[str] | None = None,
    use_async: bool | None = None,
    max_concurrent_sites: int | None = None,
    on_progress: ProgressFn | None = None,
    skip: Mapping[str, str] | None = None,
    stop: StopRequest | None = None,
    cluster: LocalDaskCluster | None = None,
    plan: RunPlan | None = None,
) -> dict[str, Any]:
    """Run the `site-pipeline` flow and return its summary (the `--summary-json` dict).

    `sites`, `use_async` and `max_concurrent_sites` override the config file (found like
    the CLI does: `config_path`, `$SITE_PIPELINE_CONFIG`, `./config.yaml`). `skip` names
    sites not to run (`--retry-failed`: they succeeded before) with a note for the summary.
    Once `stop` is requested, the running sites are stopped and end `cancelled`, and the
    summary (state "Cancelled") still comes back.
    On a local Dask cluster (`task_runner: {kind: dask}`, no `address`) the cluster starts
    here, before Prefect is imported, so it gets ready while the flow run is made, and is
    closed when the run ends (`flows.dask_cluster`); `cluster` is one the caller started
    for this run and closes itself (the CLI's `run` starts it before it connects).
    `plan`: one the caller already loaded and checked (the CLI's), used as it is, down to
    the flow: the config is read once per run (the other arguments then say nothing).
    """
    if plan is None:
        plan = load_plan(
            config_path,
            sites=sites,
            max_concurrent_sites=max_concurrent_sites,
            use_async=use_async,
        )
    skipped_reports(plan.sites, skip or {})  # a bad `skip` is a ConfigError before the run
    with ExitStack() as stack:
        if cluster is None:
            cluster = stack.enter_context(local_cluster(plan))
        from flows.site_pipeline import run_sites  # Prefect is imported only when a run starts

        with RunContext(stop=stop, on_progress=on_progress, cluster=cluster, plan=plan):
            state = run_sites(
                sites=plan.flow_sites(),
                config_path=str(plan.config_path),
                max_concurrent_sites=plan.max_concurrent_sites,
                use_async=plan.use_async,
                skip=dict(skip) if skip else None,
                return_state=True,
            )
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, dict):
        raise PipelineRunError(f"the flow run ended {state.name}: {state.message}")
    return summary


def run_pipeline(
    sites: Sequence[str | Mapping[str, Any]] | None = None,
    *,
    config_path: str | os.PathLike[str] | None = None,
    use_async: bool | None = None,
    max_concurrent_sites: int | None = None,
    on_progress: ProgressFn | None = None,
) -> dict[str, bool]:
    """Run the sites; `{site: succeeded}` in list order. Never raises because a site failed."""
    return as_bools(
        run_pipeline_summary(
            sites,
            config_path=config_path,
            use_async=use_async,
            max_concurrent_sites=max_concurrent_sites,
            on_progress=on_progress,
        )
    )


async def run_pipeline_summary_async(
    sites: Sequence[str | Mapping[str, Any]] | None = None,
    *,
    config_path: str | os.PathLike[str] | None = None,
    use_async: bool | None = None,
    max_concurrent_sites: int | None = None,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """`run_pipeline_summary` for async code: the run goes on in a worker thread, so this
    event loop keeps running; `on_progress` is called on this loop."""
    loop = asyncio.get_running_loop()

    def progress_on_loop(done: int, total: int, failed: int) -> None:
        if on_progress is not None:
            loop.call_soon_threadsafe(on_progress, done, total, failed)

    return await asyncio.to_thread(
        run_pipeline_summary,
        sites,
        config_path=config_path,
        use_async=use_async,
        max_concurrent_sites=max_concurrent_sites,
        on_progress=progress_on_loop,
    )


async def run_pipeline_async(
    sites: Sequence[str | Mapping[str, Any]] | None = None,
    *,
    config_path: str | os.PathLike[str] | None = None,
    use_async: bool | None = None,
    max_concurrent_sites: int | None = None,
    on_progress: ProgressFn | None = None,
) -> dict[str, bool]:
    """`run_pipeline` for async code; the event loop is not blocked while sites run."""
    return as_bools(
        await run_pipeline_summary_async(
            sites,
            config_path=config_path,
            use_async=use_async,
            max_concurrent_sites=max_concurrent_sites,
            on_progress=on_progress,
        )
    )


__all__ = [
    "ConfigError",
    "PipelineRunError",
    "ProgressFn",
    "StopRequest",
    "run_pipeline",
    "run_pipeline_async",
    "run_pipeline_summary",
    "run_pipeline_summary_async",
]
