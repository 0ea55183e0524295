"""The flow on a Dask cluster (prefect-dask): the same behaviour as the thread runner, with
the pipelines running under the Dask worker processes and the global cap still enforced."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterTaskRunId,
)

from flows.config import group_limit_name
from tests.conftest import PYTHON, ROOT, cli_env, read_timeline, write_config
from tests.support.processes import (
    alive,
    hanging_pids,
    start_tied,
    stop_keepers,
    tie_keepers,
    wait_until_gone,
)
from tests.support.servers import prefect_env, seed_home
from tests.support.timeline import max_overlap

pytest.importorskip(
    "prefect_dask", reason='prefect-dask is not installed: pip install -e ".[dask]"'
)

from flows.site_pipeline import run_sites

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]

SITES = ["flaky-a", "fail-b", "hang-c", "ok-d", "ok-slow-e", "ok-slow-f", "usage-g"]
DASK = {"kind": "dask", "n_workers": 2}


def summary_of(config: Path) -> dict[str, Any]:
    state = run_sites(config_path=str(config), return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), f"flow ended {state.name}: {state.message}"
    return summary


def comparable(summary: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (s["site"], s["status"], s["attempts"], s["exit_code"], (s["result"] or {}).get("site"))
        for s in summary["sites"]
    ]


def test_dask_gives_the_same_summary_as_threads_with_pipelines_under_the_workers(
    tmp_path: Path,
) -> None:
    """7 sites (flaky, failing, a timeout with a grandchild, JSON results, slow ones, a
    non-retryable exit) on a 2-worker local cluster: the same summary as the thread runner;
    every pipeline's parent is a Dask worker, not this process; the timeout leaves nothing."""
    runs = {}
    for kind in ("threads", "dask"):
        folder = tmp_path / kind
        folder.mkdir()
        config = write_config(
            folder,
            SITES,
            retry_count=2,
            timeout=3,
            kill_grace_seconds=0.5,
            max_concurrent_sites=3,
            task_runner=DASK if kind == "dask" else {"kind": "threads"},
            env={"FAKE_PIDS_DIR": str(folder), "FAKE_SLEEP": "0.3"},
        )
        runs[kind] = summary_of(config)
    assert comparable(runs["dask"]) == comparable(runs["threads"])
    by_site = {s["site"]: s for s in runs["dask"]["sites"]}
    assert by_site["flaky-a"]["attempts"] == 2 and by_site["flaky-a"]["status"] == "succeeded"
    assert by_site["hang-c"]["status"] == "timed_out" and by_site["usage-g"]["attempts"] == 1
    parents = {s["result"]["ppid"] for s in runs["dask"]["sites"] if s["result"]}
    assert os.getpid() not in parents and 1 <= len(parents) <= 2  # the workers
    assert {s["result"]["ppid"] for s in runs["threads"]["sites"] if s["result"]} == {os.getpid()}
    for pid_file in (tmp_path / "dask").glob("*.pids"):
        assert not any(alive(int(pid)) for pid in pid_file.read_text().split())
    # The pipeline's output went from the worker into the task run's logs.
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[UUID(runs["dask"]["flow_run_id"])])
            )
        )
        failing = next(run for run in task_runs if run.name == "fail-b")
        logs = client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[failing.id]))
        )
    assert any("fail-b: boom on attempt 2" in log.message for log in logs)


def test_the_cap_holds_across_dask_workers(tmp_path: Path) -> None:
    """Cap 2 on 2 workers of 4 threads each: at most 2 pipelines ever overlap."""
    config = write_config(
        tmp_path,
        [f"ok-{i}" for i in range(8)],
        max_concurrent_sites=2,
        task_runner={**DASK, "threads_per_worker": 4},
        env={"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_SLEEP": "0.8"},
    )
    summary = summary_of(config)
    assert summary["counts"]["succeeded"] == 8
    assert max_overlap(read_timeline(tmp_path)) == 2
    with get_client(sync_client=True) as client:  # the workers gave every slot back
        tag = f"test-{tmp_path.name}"[:60]
        assert client.read_global_concurrency_limit_by_name(tag).active_slots == 0


def test_a_group_cap_holds_across_dask_workers(tmp_path: Path) -> None:
    """Group cap 1 for the `grp-` sites, cap 3, on 2 workers: each worker's slot pool is
    made by the first task run it gets (which carries only its own site) and learns the
    others' groups as they come, so never more than 1 group site runs at once in all; every
    site succeeds and no slot of either limit is left taken."""
    group_sites = [f"grp-{i}.vendor.test" for i in range(4)]
    config = write_config(
        tmp_path,
        [*group_sites, *(f"ok-{i}" for i in range(4))],
        max_concurrent_sites=3,
        groups={"vendor": {"max_concurrent": 1, "match": r"\.vendor\.test$"}},
        task_runner={**DASK, "threads_per_worker": 4},
        env={"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_SLEEP": "0.6"},
    )
    summary = summary_of(config)
    assert summary["counts"]["succeeded"] == 8
    rows = read_timeline(tmp_path)
    assert max_overlap([row for row in rows if row[0].startswith("grp-")]) == 1
    assert max_overlap(rows) <= 3
    tag = f"test-{tmp_path.name}"[:60]
    with get_client(sync_client=True) as client:
        for name in (tag, group_limit_name(tag, "vendor")):
            assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


def test_sigterm_of_the_flow_process_stops_the_pipelines_on_the_workers(
    tmp_path: Path, prefect_api: str
) -> None:
    """SIGTERM to `site-pipeline run` (a cancel) with sites on Dask workers: every pipeline
    and grandchild on the workers is gone soon after."""
    config = write_config(
        tmp_path,
        ["hang-a", "hang-b"],
        max_concurrent_sites=2,
        kill_grace_seconds=1,
        task_runner=DASK,
    )
    proc = start_tied(
        [PYTHON, "-m", "flows", "run", "--config", str(config)],
        cwd=ROOT,
        env=cli_env(prefect_api),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids = hanging_pids(tmp_path, 2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=90)
    assert wait_until_gone(pids, timeout=30) == []


@pytest.mark.parametrize("idle", [0, 300])
def test_a_local_cluster_uses_the_embedded_default_s_one_server(tmp_path: Path, idle: int) -> None:
    """With no PREFECT_API_URL, `site-pipeline run` on a local cluster uses one Prefect
    server and the Dask workers use it, never one of their own per worker: the local server,
    outside the run's tree (none under it), with `local_server_idle: 0` (it stops with the
    run) or not (kept)."""
    config = write_config(
        tmp_path,
        [f"ok-{i}" for i in range(4)],
        max_concurrent_sites=2,
        task_runner=DASK,
        env={"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_SLEEP": "2"},
        local_server_idle=idle,
    )
    proc = start_tied(
        [PYTHON, "-m", "flows", "run", "--config", str(config)],
        cwd=ROOT,
        # no PREFECT_API_URL: the embedded default, on an already migrated database
        env=prefect_env(seed_home(tmp_path / "home")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    most = 0
    while proc.poll() is None:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        servers = 0
        for child in tree:
            try:
                servers += any("prefect.server" in part for part in child.cmdline())
            except psutil.Error:
                pass
        most = max(most, servers)
        time.sleep(0.2)
    tie_keepers(tmp_path)
    stop_keepers(tmp_path)
    assert proc.returncode == 0
    assert most == 0
    assert len([row for row in read_timeline(tmp_path) if row[1] == "start"]) == 4


def test_a_local_cluster_keeps_no_profiler_and_short_developer_logs(tmp_path: Path) -> None:
    """The local cluster's workers have Dask's statistical profiler off (it feeds a
    dashboard the local cluster doesn't have, and grows each worker's memory); the workers
    and the scheduler (in the flow's process) keep 20 entries of Dask's developer logs, not
    1,000: the scheduler's streams to its workers keep that many batches they sent, each
    with its task runs' parameters. The cluster has the configured number of workers."""
    import dask

    from flows.config import load_plan
    from flows.engine.task_runners import task_runner

    def settings() -> tuple[object, object]:
        return (
            dask.config.get("distributed.worker.profile.enabled"),
            dask.config.get("distributed.admin.low-level-log-length"),
        )

    plan = load_plan(write_config(tmp_path, ["ok-a"], task_runner=DASK))
    with task_runner(plan) as runner:
        client = runner.client  # type: ignore[attr-defined]
        on_workers = client.run(settings)
        streams = client.run_on_scheduler(
            lambda dask_scheduler: sorted(
                ws.maxlen
                for ws in (
                    stream.recent_message_log for stream in dask_scheduler.stream_comms.values()
                )
            )
        )
    assert len(on_workers) == 2
    assert set(on_workers.values()) == {(False, 20)}
    assert streams == [20, 20]
    assert dask.config.get("distributed.admin.low-level-log-length") == 1000  # put back
