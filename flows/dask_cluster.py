"""A run's local Dask cluster, started in the background as soon as its plan is known.

With `task_runner: {kind: dask}` and no `address`, a run has a local cluster: its scheduler
in this process and `n_workers` worker processes, each under a Nanny. Each worker loads
what its task runs need at its start (a Dask preload, `flows.engine.dask_worker`), which
the first site on each worker used to wait for (about a second here). The caller of the
flow (`flows.api.run_pipeline_summary`, the CLI's `run`) starts the cluster before it even
imports Prefect, so the cluster gets ready while the flow run is created, and hands it to
the flow (`RunContext.cluster`); the flow's task runner connects to it
(`flows.engine.task_runners`) and, once the sites have ended, starts closing it in the
background while the flow finishes. A flow run started any other way (a deployment's)
starts one at its task runner and closes it there. Whoever starts a cluster closes it: on
every way out, a raise or Ctrl-C included (`local_cluster`), its workers end, and with them
their pipelines (each worker's reaper).

Plain Python and Dask: no Prefect here, so starting a cluster waits for no Prefect import.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from flows.config import RunPlan

if TYPE_CHECKING:
    import distributed

WORKER_PRELOAD = "flows.engine.dask_worker"
"""Imported by each local worker as it starts (a Dask preload): what its task runs load."""

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


class WorkerWaitEnded(RuntimeError):
    """A run's wait for a first Dask worker ended without one (`task_runner.worker_wait`
    passed, or the run was asked to stop: `flows.engine.dask_runner`). An expected outcome
    of a cluster that gave no worker, not a bug here: its message is the one line the flow
    run fails with (`flows.engine.logfilter` keeps Prefect's record of it to that line)."""


def wants_local_cluster(plan: RunPlan) -> bool:
    """Whether the plan's sites run on a local Dask cluster (Dask, and no `address`)."""
    settings = plan.config.task_runner
    return settings.kind == "dask" and not settings.address


def default_workers(cores: int | None = None) -> int:
    """The worker count Dask's `LocalCluster` picks by default for `cores`: all cores as
    processes up to 4; above, the smallest factor of the core count that is at least its
    square root (Dask's rule, restated: its own function is not public API). `None`: the
    cores Dask counts for this process (`dask.system.CPU_COUNT`: the machine's cores, less
    the affinity mask and any cgroup CPU quota), as `LocalCluster` does."""
    if cores is None:
        from dask.system import CPU_COUNT

        cores = CPU_COUNT
    cores = max(1, cores)
    if cores <= 4:
        return cores
    return min(f for f in range(1, cores + 1) if cores % f == 0 and f >= math.sqrt(cores))


def local_cluster_size(plan: RunPlan) -> tuple[int, int]:
    """(workers, threads per worker) for a local cluster: Dask's default worker count unless
    configured (`default_workers`), and enough threads in all for the plan's thread budget."""
    settings = plan.config.task_runner
    workers = settings.n_workers or default_workers()
    threads = settings.threads_per_worker or max(1, math.ceil(plan.workers / workers))
    return workers, threads


class LocalDaskCluster:
    """A `distributed.LocalCluster` for `plan`, starting in a thread of its own from the
    moment this is made: `cluster()` waits for it; `close()` closes it (once started)."""

    def __init__(self, plan: RunPlan) -> None:
        workers, threads = local_cluster_size(plan)
        self.kwargs: dict[str, Any] = {
            "n_workers": workers,
            "threads_per_worker": threads,
            "processes": True,
            "dashboard_address": None,
            "preload": [WORKER_PRELOAD],
        }
        self._cluster: distributed.LocalCluster | None = None
        self._error: BaseException | None = None
        self._config: Any = None  # the `dask.config.set` held while the cluster lives
        self._closing: threading.Thread | None = None
        self._lock = threading.Lock()
        self._starting = threading.Thread(
            target=self._start, name="site-pipeline-dask-start", daemon=True
        )
        self._starting.start()

    def _start(self) -> None:
        try:
            import dask.config
            import distributed

            self._config = dask.config.set(LOCAL_CLUSTER_CONFIG)
            self._cluster = distributed.LocalCluster(**self.kwargs)  # type: ignore[no-untyped-call]
        except BaseException as exc:  # handed to whoever waits for the cluster
            self._error = exc

    def cluster(self) -> distributed.LocalCluster:
        """The started cluster (waits for its start). Raises what its start raised."""
        self._starting.join()
        if self._closing is not None:
            raise RuntimeError("this local Dask cluster was closed")
        if self._cluster is None:
            raise self._error or RuntimeError("the local Dask cluster did not start")
        return self._cluster

    def close(self, wait: bool = True) -> None:
        """Close the cluster (after its start, if it is still starting): its workers end.
        `wait=False` starts closing it in the background (the run needs it no more, and
        what it does meanwhile need not wait); a later `close()` waits for that."""
        with self._lock:
            if self._closing is None:
                self._closing = threading.Thread(
                    target=self._close, name="site-pipeline-dask-close", daemon=True
                )
                self._closing.start()
        if wait:
            self._closing.join()

    def _close(self) -> None:
        self._starting.join()
        try:
            if self._cluster is not None:
                self._cluster.close()
        finally:
            if self._config is not None:
                self._config.__exit__(None, None, None)

    def __repr__(self) -> str:
        state = "closed" if self._closing else "started" if self._cluster else "starting"
        return f"LocalDaskCluster({state}, {self.kwargs['n_workers']} workers)"


@contextmanager
def local_cluster(plan: RunPlan) -> Iterator[LocalDaskCluster | None]:
    """The plan's local cluster, starting now, closed on exit; None when the plan has none."""
    if not wants_local_cluster(plan):
        yield None
        return
    started = LocalDaskCluster(plan)
    try:
        yield started
    finally:
        started.close()
