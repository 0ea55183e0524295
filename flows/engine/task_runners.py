"""Where `run_site` task runs run: threads in the flow's process, or a Dask cluster.

`pipeline.task_runner.kind: dask` sends each task run to a Dask worker through
`prefect-dask` (the `dask` extra), so each pipeline process runs on that worker's machine;
`flows.engine.dask_runner` sends what the task runs share once, not once per site.
The task is self-contained (`flows.engine.task.SiteJob`), takes its concurrency slots from the
Prefect server, and stops its own process groups, so the cap and the timeouts hold there too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.config import RunPlan

DASK_EXTRA = 'pip install -e ".[dask]"'

LOCAL_CLUSTER_CONFIG: dict[str, Any] = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.low-level-log-length": 20,
}
"""Set in this process while a local cluster lives (its scheduler runs here; each Nanny
hands this config to its worker). Both feed a dashboard or a developer's post-mortem, and a
local cluster here has neither:
- the statistical profiler (a sample of every thread's stack every 10 ms, kept for 1,000 s)
  was half of each worker's memory growth in the soak (`bench/soak.py`);
- the "low-level" logs (1,000 entries by default) include the last 1,000 batches each
  scheduler-to-worker stream sent, with every task's parameters unpickled: in a 500-site
  soak they were the flow process's whole growth (0.45 MB a site with the whole plan in
  each task run's parameters, 0.2 MB with only its own site's share).
A cluster at `address` keeps its own config."""


def local_cluster_size(plan: RunPlan) -> tuple[int, int]:
    """(workers, threads per worker) for a local cluster: Dask's default worker count unless
    configured (`flows._prefect_compat.dask_default_workers`), and enough threads in all for
    the plan's thread budget."""
    from flows._prefect_compat import dask_default_workers

    settings = plan.config.task_runner
    workers = settings.n_workers or dask_default_workers()
    threads = settings.threads_per_worker or max(1, math.ceil(plan.workers / workers))
    return workers, threads


@contextmanager
def task_runner(plan: RunPlan) -> Iterator[TaskRunner[Any]]:
    """The plan's task runner, started; stopped (and a local cluster closed) on exit."""
    settings = plan.config.task_runner
    if settings.kind == "threads":
        with ThreadPoolTaskRunner[Any](max_workers=plan.workers) as threads:
            yield threads
        return
    from flows.engine.dask_runner import SharedContextDaskRunner as DaskTaskRunner

    if settings.address:
        dask = DaskTaskRunner(address=settings.address)
    else:
        workers, threads_per_worker = local_cluster_size(plan)
        dask = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": threads_per_worker,
                "processes": True,
                "dashboard_address": None,
            }
        )
    # Task runs carry the flow's settings to the workers. On the embedded default those name
    # no API URL, so each worker would start a temporary server of its own: name the flow's.
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    updates = {} if get_current_settings().api.url else {PREFECT_API_URL: api_url}
    from dask import config as dask_config

    local = {} if settings.address else LOCAL_CLUSTER_CONFIG
    with temporary_settings(updates=updates), dask_config.set(local), dask as runner:
        yield runner
