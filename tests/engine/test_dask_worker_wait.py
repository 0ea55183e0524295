"""A Dask cluster that starts with no workers (issue 43): `adapt(minimum=0, maximum=2)`, the
usual setup of dask-jobqueue and dask-kubernetes. A run waits for workers for
`task_runner.worker_wait`, then runs as on any cluster; with no worker in that time, the
flow run fails with one line naming the address and the wait."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client

from tests.conftest import PYTHON, ROOT, cli_env, read_timeline, write_config
from tests.support.processes import start_tied, stop_tied
from tests.support.timeline import max_overlap
from tests.support.waiting import wait_until

pytest.importorskip(
    "prefect_dask", reason='prefect-dask is not installed: pip install -e ".[dask]"'
)

import distributed

from flows.site_pipeline import run_sites

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]


@pytest.fixture
def adaptive() -> Iterator[distributed.LocalCluster]:
    """A real local cluster with no workers, adaptive from 0 to 2 (2 threads each)."""
    with distributed.LocalCluster(
        n_workers=0, threads_per_worker=2, processes=True, dashboard_address=None
    ) as cluster:
        cluster.adapt(minimum=0, maximum=2, interval="200ms", wait_count=3)
        yield cluster


def summary_of(config: Path) -> tuple[str, dict[str, Any] | None, str]:
    state = run_sites(config_path=str(config), return_state=True)
    summary = state.result(raise_on_failure=False)
    return state.name or "", summary if isinstance(summary, dict) else None, state.message or ""


def test_a_run_on_a_cluster_that_starts_empty_waits_for_workers_and_keeps_the_cap(
    tmp_path: Path, adaptive: distributed.LocalCluster
) -> None:
    """An adaptive cluster with no worker at the start: the run waits while it scales up,
    then every site has its right outcome (a retry, a failure, successes), at most 2
    pipelines (the cap) overlap on the workers' 4 threads, and no slot is left taken."""
    assert len(adaptive.scheduler_info["workers"]) == 0
    sites = ["flaky-a", "fail-b", *(f"ok-{i}" for i in range(5))]
    config = write_config(
        tmp_path,
        sites,
        retry_count=2,
        max_concurrent_sites=2,
        task_runner={"kind": "dask", "address": adaptive.scheduler_address, "worker_wait": 120},
        env={"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_SLEEP": "0.5"},
    )
    name, summary, message = summary_of(config)
    assert summary is not None, f"flow ended {name}: {message}"
    outcomes = {s["site"]: (s["status"], s["attempts"]) for s in summary["sites"]}
    assert outcomes == {
        "flaky-a": ("succeeded", 2),
        "fail-b": ("failed", 2),
        **{f"ok-{i}": ("succeeded", 1) for i in range(5)},
    }
    assert max_overlap(read_timeline(tmp_path)) == 2
    with get_client(sync_client=True) as client:
        tag = f"test-{tmp_path.name}"[:60]
        assert client.read_global_concurrency_limit_by_name(tag).active_slots == 0


def test_with_no_worker_in_worker_wait_the_run_fails_with_one_line_naming_address_and_wait(
    tmp_path: Path, prefect_api: str
) -> None:
    """A cluster that never gets a worker (no adapt), `worker_wait: 2`: `site-pipeline run`
    fails soon after 2 s, with one line naming the scheduler's address and the wait; no
    site ran."""
    with distributed.LocalCluster(n_workers=0, processes=True, dashboard_address=None) as empty:
        address = empty.scheduler_address
        config = write_config(
            tmp_path,
            ["ok-a", "ok-b"],
            task_runner={"kind": "dask", "address": address, "worker_wait": 2},
        )
        started = time.monotonic()
        proc = subprocess.run(
            [PYTHON, "-m", "flows", "run", "--config", str(config)],
            cwd=ROOT,
            env=cli_env(prefect_api),
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - started
    output = proc.stdout + proc.stderr
    line = f"no Dask worker at {address} within task_runner.worker_wait = 2 s"
    assert proc.returncode == 1, output
    assert f"no Dask worker at {address} yet: waiting up to 2 s" in output, output
    assert line in output, output
    assert "Traceback" not in output, output  # the one line, not a bug's traceback
    assert took < 60, output
    assert not (tmp_path / "timeline.tsv").exists()


def test_a_run_waiting_for_a_worker_stops_on_sigterm(tmp_path: Path, prefect_api: str) -> None:
    """SIGTERM to `site-pipeline run` while it waits for a worker (`worker_wait: 300`): it
    ends within `kill_grace_seconds` + 5 s, exit 143; no site ran."""
    with distributed.LocalCluster(n_workers=0, processes=True, dashboard_address=None) as empty:
        address = empty.scheduler_address
        config = write_config(
            tmp_path,
            ["ok-a"],
            kill_grace_seconds=1,
            task_runner={"kind": "dask", "address": address, "worker_wait": 300},
        )
        log = tmp_path / "out.txt"
        with log.open("w") as out:
            proc = start_tied(
                [PYTHON, "-m", "flows", "run", "--config", str(config)],
                cwd=ROOT,
                env=cli_env(prefect_api),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_until(lambda: "waiting up to 300 s" in log.read_text(), "the wait's line", 120)
                proc.send_signal(signal.SIGTERM)
                stopped = time.monotonic()
                proc.wait(timeout=30)
                took = time.monotonic() - stopped
            finally:
                stop_tied(proc)
    output = log.read_text()
    assert proc.returncode == 143, output
    assert took <= 1 + 5, output
    assert not (tmp_path / "timeline.tsv").exists()


def test_the_wait_for_a_worker_ends_once_the_run_is_asked_to_stop() -> None:
    """The runner's wait looks at the run's stop request between its looks for a worker:
    once asked to stop it ends with one line naming the address, long before its wait."""
    from flows.dask_cluster import WorkerWaitEnded
    from flows.engine.dask_runner import SharedContextDaskRunner

    asked: list[float] = []

    def stopped() -> bool:
        asked.append(time.monotonic())
        return len(asked) >= 2

    with distributed.LocalCluster(n_workers=0, processes=True, dashboard_address=None) as empty:
        with SharedContextDaskRunner(address=empty.scheduler_address) as runner:
            started = time.monotonic()
            with pytest.raises(WorkerWaitEnded) as ended:
                runner.wait_for_workers(300, stopped, say=lambda line: None)
            took = time.monotonic() - started
    assert (
        str(ended.value) == f"stopped while waiting for a Dask worker at {empty.scheduler_address}"
    )
    assert len(asked) == 2 and took < 10


def test_the_runner_sends_what_task_runs_share_to_a_cluster_with_no_worker_yet(
    adaptive: distributed.LocalCluster,
) -> None:
    """Submits on an adaptive cluster that has no worker at that moment (no wait first, as
    a flow that names the runner itself does): what the task runs share is sent without a
    broadcast (which fails with no worker: Dask's 'No valid workers found'); the cluster
    scales up for the task runs and each runs on a worker, in the flow run."""
    from prefect import flow, task
    from prefect.context import FlowRunContext
    from prefect.runtime import flow_run

    from flows.engine.dask_runner import SharedContextDaskRunner

    @task
    def where(n: int) -> tuple[int, int, str]:
        return n, os.getpid(), str(flow_run.get_id())

    @flow(task_runner=SharedContextDaskRunner(address=adaptive.scheduler_address))
    def fan_out() -> tuple[str, list[tuple[int, int, str]]]:
        runner = FlowRunContext.get().task_runner  # type: ignore[union-attr]
        assert runner.client.scheduler_info()["workers"] == {}
        futures = [runner.submit(where, {"n": n}, dependencies={}) for n in range(4)]
        return str(flow_run.get_id()), [f.result() for f in futures]

    flow_run_id, results = fan_out()
    assert [n for n, _, _ in results] == [0, 1, 2, 3]
    assert os.getpid() not in {pid for _, pid, _ in results}
    assert {seen for _, _, seen in results} == {flow_run_id}
