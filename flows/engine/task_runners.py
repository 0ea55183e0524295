"""Where `run_site` task runs run: threads in the flow's process, or a Dask cluster.

`pipeline.task_runner.kind: dask` sends each task run to a Dask worker through
`prefect-dask` (the `dask` extra), so each pipeline process runs on that worker's machine;
`flows.engine.dask_runner` sends what the task runs share once, not once per site. A run
on a cluster with no worker yet (an adaptive one, scaling from zero) waits for one for
`task_runner.worker_wait` seconds before its first site, or fails naming the address.
The task is self-contained (`flows.engine.site_job.SiteJob`), takes its concurrency slots from the
Prefect server, and stops its own process groups, so the cap and the timeouts hold there too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from typing import Any

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.config import RunPlan
from flows.context import RunContext
from flows.dask_cluster import LocalDaskCluster

DASK_EXTRA = 'pip install -e ".[dask]"'


@contextmanager
def task_runner(
    plan: RunPlan, cluster: LocalDaskCluster | None = None
) -> Iterator[TaskRunner[Any]]:
    """The plan's task runner, started; stopped on exit. On a local Dask cluster: `cluster`,
    the one the flow's caller started for this run (`flows.dask_cluster`), which starts
    closing in the background on exit (its caller waits for that), else one started here
    and closed on exit."""
    settings = plan.config.task_runner
    if settings.kind == "threads":
        with _threads(plan.workers) as threads:
            yield threads
        return
    from flows.engine.dask_runner import SharedContextDaskRunner as DaskTaskRunner

    with ExitStack() as own:
        if settings.address:
            dask = DaskTaskRunner(address=settings.address)
        else:
            if cluster is None:
                cluster = own.enter_context(closing(LocalDaskCluster(plan)))
            else:  # the caller's, for this run only: it starts closing once the sites ended
                own.callback(cluster.close, wait=False)
            dask = DaskTaskRunner(cluster=cluster.cluster())
        # Task runs carry the flow's settings to the workers. On the embedded default those
        # name no API URL, so each worker would start a temporary server of its own: name
        # the flow's.
        with get_client(sync_client=True) as client:
            api_url = str(client.api_url).rstrip("/")
        updates = {} if get_current_settings().api.url else {PREFECT_API_URL: api_url}
        stop = RunContext.get().stop
        say = get_run_logger().info if FlowRunContext.get() is not None else None
        with temporary_settings(updates=updates), dask as runner:
            # A cluster with no worker yet (an adaptive one, from zero): wait for one.
            runner.wait_for_workers(
                settings.worker_wait, lambda: stop is not None and stop.requested, say
            )
            yield runner


@contextmanager
def _threads(workers: int) -> Iterator[ThreadPoolTaskRunner[Any]]:
    """A thread pool task runner. Once the run was asked to stop, its exit does not wait for
    the threads: one may sleep through the rest of a retry delay in Prefect's task engine
    (`time.sleep`, which nothing wakes), and the run's summary must not wait for it. Such a
    thread, once awake, finds the run stopping and ends its site `cancelled` at once."""
    runner = ThreadPoolTaskRunner[Any](max_workers=workers)
    runner.__enter__()
    try:
        yield runner
    finally:
        stop = RunContext.get().stop
        if stop is not None and stop.requested:
            threading.Thread(
                target=runner.__exit__, args=(None, None, None), name="site-pipeline-threads-exit",
                daemon=True,
            ).start()  # fmt: skip
        else:
            runner.__exit__(None, None, None)
