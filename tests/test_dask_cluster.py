"""A run's local Dask cluster (`flows.dask_cluster`): started in the background before Prefect
is imported, its workers loaded before their first task run, closed by whoever started it,
and handed to the flow by its caller (the CLI's `run`, `run_pipeline_summary`)."""

from __future__ import annotations

import argparse
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from flows import dask_cluster
from flows.config import load_plan
from flows.dask_cluster import WORKER_PRELOAD, LocalDaskCluster, local_cluster
from tests.conftest import write_config
from tests.support.processes import wait_until_gone

distributed = pytest.importorskip(
    "distributed", reason='Dask is not installed: pip install -e ".[dask]"'
)

DASK = {"kind": "dask", "n_workers": 2, "threads_per_worker": 3}
REMOTE = {"kind": "dask", "address": "tcp://127.0.0.1:1"}


def worker_pids(cluster: LocalDaskCluster) -> list[int]:
    import os

    with distributed.Client(cluster.cluster()) as client:
        return sorted(client.run(os.getpid).values())


def test_a_plan_without_a_local_cluster_starts_none(tmp_path: Path) -> None:
    """Threads, and Dask at an `address` (a cluster someone else runs), start no cluster."""
    for name, runner in [("threads", {"kind": "threads"}), ("remote", REMOTE)]:
        (tmp_path / name).mkdir()
        plan = load_plan(write_config(tmp_path / name, ["a"], task_runner=runner))
        with local_cluster(plan) as cluster:
            assert cluster is None, name


def test_the_default_worker_count_is_the_one_local_cluster_picks() -> None:
    """`default_workers` restates the rule `LocalCluster` takes its default worker count by
    (Dask's `distributed.deploy.utils.nprocesses_nthreads`, private: read here only, so this
    fails when Dask changes its rule): the same count for 1 to 128 cores, and for this
    process's cores as Dask counts them (`dask.system.CPU_COUNT`, affinity and cgroup quota
    included). A plan with no `n_workers` gets that many workers."""
    from dask.system import CPU_COUNT
    from distributed.deploy.utils import nprocesses_nthreads

    assert "nprocesses_nthreads" in inspect.getsource(distributed.LocalCluster.__init__)
    for cores in range(1, 129):
        assert dask_cluster.default_workers(cores) == nprocesses_nthreads(cores)[0], cores
    assert dask_cluster.default_workers() == nprocesses_nthreads()[0]
    assert dask_cluster.default_workers() == dask_cluster.default_workers(CPU_COUNT)


def test_a_plan_without_n_workers_gets_dask_s_default_count(tmp_path: Path) -> None:
    """No `n_workers`: Dask's default count, and threads enough for the plan's budget."""
    plan = load_plan(write_config(tmp_path, ["a"], task_runner={"kind": "dask"}))
    workers, threads = dask_cluster.local_cluster_size(plan)
    assert workers == dask_cluster.default_workers()
    assert workers * threads >= plan.workers


@pytest.mark.slow
def test_the_workers_are_loaded_before_their_first_task_and_sized_as_configured(
    tmp_path: Path,
) -> None:
    """Each worker of the configured 2 (3 threads each) has, before it ran any task, the
    preload (`flows.engine.dask_worker`: Prefect, the task runner's worker side) imported and
    every installed Prefect collection loaded, which the first site on a worker used to wait
    for. The cluster is closed on leaving `local_cluster`, and its workers are gone."""

    def loaded() -> tuple[bool, bool, bool]:
        names = [ep.value.split(":")[0] for ep in entry_points(group="prefect.collections")]
        return (
            WORKER_PRELOAD in sys.modules,
            "flows.engine.dask_runner" in sys.modules,
            all(name in sys.modules for name in names),
        )

    assert list(entry_points(group="prefect.collections")), "no collection to see loaded"
    plan = load_plan(write_config(tmp_path, ["a"], task_runner=DASK))
    with local_cluster(plan) as cluster:
        assert cluster is not None
        with distributed.Client(cluster.cluster()) as client:
            on_workers = client.run(loaded)
            threads = client.nthreads()
        pids = worker_pids(cluster)
    assert list(on_workers.values()) == [(True, True, True)] * 2
    assert sorted(threads.values()) == [3, 3]
    assert "closed" in repr(cluster)
    assert wait_until_gone(pids, timeout=30) == []


@pytest.mark.slow
def test_a_close_in_the_background_is_waited_for_by_the_next_close(tmp_path: Path) -> None:
    """`close(wait=False)` (the flow's task runner, once the sites ended) returns at once;
    the caller's `close()` then waits until the workers are gone and Dask's config is put
    back. A closed cluster is not handed out again, and closing twice is harmless."""
    import dask

    plan = load_plan(write_config(tmp_path, ["a"], task_runner=DASK))
    cluster = LocalDaskCluster(plan)
    pids = worker_pids(cluster)
    assert dask.config.get("distributed.admin.low-level-log-length") == 20  # while it lives
    cluster.close(wait=False)
    with pytest.raises(RuntimeError, match="was closed"):
        cluster.cluster()
    cluster.close()
    assert wait_until_gone(pids, timeout=5) == []
    assert dask.config.get("distributed.admin.low-level-log-length") == 1000
    cluster.close()


def test_a_cluster_that_failed_to_start_raises_its_error_where_it_is_wanted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start runs in a thread; what it raised is raised by `cluster()`, in the run that
    wants the cluster, not lost in that thread. Closing it after is harmless."""

    def refuse(**kwargs: Any) -> None:
        raise OSError(f"no ports for {kwargs['n_workers']} workers")

    monkeypatch.setattr(distributed, "LocalCluster", refuse)
    cluster = LocalDaskCluster(load_plan(write_config(tmp_path, ["a"], task_runner=DASK)))
    with pytest.raises(OSError, match="no ports for 2 workers"):
        cluster.cluster()
    cluster.close()


class Recorded:
    """Stands in for `LocalDaskCluster` where only the order of events matters."""

    events: list[str]

    def __init__(self, plan: object) -> None:
        self.events.append("cluster started")

    def close(self, wait: bool = True) -> None:
        self.events.append("cluster closed")


def test_run_starts_the_cluster_before_it_connects_and_closes_it_on_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`site-pipeline run` on a local cluster starts the cluster first, so it gets ready
    while the API is checked and the flow run made, and closes it whatever the run's end:
    here the server can't be reached (exit 1)."""
    from flows.cli import run

    events: list[str] = []
    monkeypatch.setattr(Recorded, "events", events, raising=False)
    monkeypatch.setattr(dask_cluster, "LocalDaskCluster", Recorded)

    def no_server(idle: float, run: bool = False) -> None:
        events.append("connect")

    monkeypatch.setattr(run, "connect", no_server)
    plan = load_plan(write_config(tmp_path, ["a"], task_runner=DASK))
    args = argparse.Namespace(verbose=False, quiet=False)
    assert run.run_plan(args, plan) == run.EXIT_FAILED
    assert events == ["cluster started", "connect", "cluster closed"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_the_flow_runs_its_sites_on_the_cluster_its_caller_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run_pipeline_summary(cluster=...)`: the flow's task runner uses that cluster (it
    starts none of its own), and starts closing it once the sites have ended."""
    from flows import api
    from flows.engine import task_runners

    def no_second(plan: object) -> None:
        raise AssertionError("the flow started a cluster of its own")

    config = write_config(tmp_path, ["ok-a", "ok-b"], task_runner=DASK)
    cluster = LocalDaskCluster(load_plan(config))
    monkeypatch.setattr(task_runners, "LocalDaskCluster", no_second)
    try:
        pids = worker_pids(cluster)
        summary = api.run_pipeline_summary(config_path=str(config), cluster=cluster)
        assert "closed" in repr(cluster)
    finally:
        cluster.close()
    assert [(s["site"], s["status"]) for s in summary["sites"]] == [
        ("ok-a", "succeeded"),
        ("ok-b", "succeeded"),
    ]
    assert wait_until_gone(pids, timeout=5) == []
