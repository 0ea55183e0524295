"""End to end, as the README's Deploy section: a real `prefect server start`, `site-pipeline
setup`, `prefect --no-prompt deploy --all`, a process worker, and `prefect deployment run ...
--watch`; then the history is checked through the API.

On SQLite only: a deployment's path is the same on any database, and a run on a PostgreSQL
server is proved by `tests/e2e/test_server_settings.py` (`[postgres]`)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterTaskRunId,
)
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import ROOT, read_timeline, write_config
from tests.support.processes import hanging_pids, run_tied, wait_until_gone
from tests.support.servers import BIN, prefect_env, prefect_server, process_worker
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

SITES = ["ok-one.com", "fail-two.com", "ok-three.com", "flaky-four.com"]
FAILED_TWO = (  # the run's Failed message: the failed site under its cause
    r"1 of 4 sites failed: 1 \N{MULTIPLICATION SIGN} fail-two\.com: boom on attempt \d+ "
    r"\(fail-two\.com\)"
)


def wait_final(client: SyncPrefectClient, flow_run_id: UUID, after_run_count: int = 0) -> State:
    """The flow run's final state, once it has run more than `after_run_count` times."""

    def final() -> State | None:
        run = client.read_flow_run(flow_run_id)
        done = run.state is not None and run.state.is_final() and run.run_count > after_run_count
        return run.state if done else None

    return wait_until(final, f"flow run {flow_run_id} ends", timeout=180, every=0.5)


def sh(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return run_tied(args, cwd=ROOT, env=env, timeout=timeout)


def test_deployment_run_on_a_real_server_and_worker(tmp_path: Path) -> None:
    """setup, deploy, worker and `prefect deployment run --watch` give one task run per site,
    the right states, the failing site's stderr in its logs, the artifacts, the nightly
    schedule, and `site-pipeline history --json` reports the run. The UI's Retry and `submit
    --retry-failed` run only the failed site again. Cancelling a run stops its pipelines."""
    config = write_config(tmp_path, SITES, retry_count=2, retry_delay=0.2, concurrency_tag="e2e")
    with prefect_server(tmp_path / "prefect-home") as server:
        env = prefect_env(tmp_path / "client-home", server, PWD=str(ROOT))
        set_up_and_deploy(env, config)
        # One worker for every run below, started once 'site-pool' exists (`setup` made it).
        with process_worker(env, "site-pool", ROOT, tmp_path / "worker.log"):
            flow_run_id = run_and_read_the_history(server, env, config, tmp_path)
            retry_the_failed_night(server, env, tmp_path, flow_run_id)
            cancel_a_run(server, env, tmp_path)


def site_pipeline(*args: str) -> list[str]:
    return [str(BIN / "site-pipeline"), *args]


def prefect(*args: str) -> list[str]:
    return [str(BIN / "prefect"), *args]


def set_up_and_deploy(env: dict[str, str], config: Path) -> None:
    """`setup` (twice: idempotent) and `prefect deploy --all`; a bad parameter runs nothing."""
    setup = sh(site_pipeline("setup", "--config", str(config)), env)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "created process work pool 'site-pool'" in setup.stdout
    again = sh(site_pipeline("setup", "--config", str(config)), env)
    assert again.returncode == 0 and "created" not in again.stdout  # idempotent
    assert again.stdout.count("unchanged") == 3  # the pool, the limit, the heartbeat automation

    deploy = sh(prefect("--no-prompt", "deploy", "--all"), env)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    # The schema is enforced: an unknown parameter creates no flow run.
    bogus = sh(prefect("deployment", "run", "site-pipeline/adhoc", "--param", "bogus=1"), env)
    assert bogus.returncode != 0 and "bogus" in bogus.stdout + bogus.stderr
    ours = sh(site_pipeline("submit", "--param", "bogus=1"), env)
    assert ours.returncode == 2 and len(ours.stderr.strip().splitlines()) == 1, ours.stderr


def run_and_read_the_history(
    server: str, env: dict[str, str], config: Path, tmp_path: Path
) -> UUID:
    """`prefect deployment run --watch` and `submit`; what the API and `history` say of them.
    Returns the failed run's id."""
    run = sh(
        prefect(
            "deployment",
            "run",
            "site-pipeline/adhoc",
            "--param",
            f"sites={json.dumps(SITES)}",
            "--param",
            f"config_path={config}",
            "--watch",
            "--watch-timeout",
            "240",
        ),
        env,
        timeout=300,
    )
    submitted = sh(
        site_pipeline("submit", "--site", "ok-five.com", "--param", f"config_path={config}"),
        env,
        timeout=300,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "Completed" in submitted.stdout
    worker_log = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
    assert "Failed" in run.stdout, run.stdout + run.stderr + worker_log  # one site fails

    with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("site-pipeline/adhoc")
        flow_runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["adhoc"]))
        )
        assert len(flow_runs) == 2  # the --watch run and the submitted one; `bogus` made none
        flow_run = next(r for r in flow_runs if r.parameters.get("sites") == SITES)
        assert flow_run.deployment_id == deployment.id
        assert flow_run.state is not None and flow_run.state.is_failed()
        assert re.fullmatch(FAILED_TWO, flow_run.state.message or ""), flow_run.state.message

        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
        states = {t.name: t.state.type.value if t.state else None for t in task_runs}
        assert states == {
            "ok-one.com": "COMPLETED",
            "fail-two.com": "FAILED",
            "ok-three.com": "COMPLETED",
            "flaky-four.com": "COMPLETED",
        }
        failing = next(t for t in task_runs if t.name == "fail-two.com")
        logs = client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[failing.id]))
        )
        assert any("fail-two.com: boom on attempt 2" in log.message for log in logs)

        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
        assert "site-pipeline-summary" in {a.key for a in artifacts}

        nightly = client.read_deployment_by_name("site-pipeline/nightly")
        assert [s.schedule.model_dump().get("cron") for s in nightly.schedules] == ["0 2 * * *"]
        assert nightly.schedules[0].schedule.model_dump().get("timezone") == "UTC"
        assert nightly.work_pool_name == "site-pool" and nightly.enforce_parameter_schema

    history = sh(site_pipeline("history", "--json"), env)
    assert history.returncode == 0, history.stderr
    data = json.loads(history.stdout)
    run_entry = next(r for r in data["runs"] if r["flow_run_id"] == str(flow_run.id))
    assert run_entry["state"] == "Failed"
    assert (run_entry["succeeded"], run_entry["failed"]) == (3, 1)
    assert data["runs"][0]["state"] == "Completed"  # newest first: the submitted run
    by_site = {entry["site"]: entry for entry in data["sites"]}
    assert by_site["fail-two.com"]["last_status"] == "failed"
    assert by_site["fail-two.com"]["last_succeeded_at"] is None
    assert by_site["ok-one.com"]["last_succeeded_at"] is not None
    assert by_site["ok-five.com"]["last_status"] == "succeeded"
    only = json.loads(sh(site_pipeline("history", "--json", "--site", "fail-two.com"), env).stdout)
    assert [entry["site"] for entry in only["sites"]] == ["fail-two.com"]
    assert [UUID(r["flow_run_id"]) for r in only["runs"]] == [flow_run.id]
    return flow_run.id


def retry_the_failed_night(
    server: str, env: dict[str, str], tmp_path: Path, flow_run_id: UUID
) -> None:
    """The UI's Retry (`prefect flow-run retry`) runs the same flow run again: the sites that
    succeeded come back from the result cache without running; then `submit --retry-failed`
    makes a new run of the same deployment with only the rest."""
    with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        run_count = client.read_flow_run(flow_run_id).run_count
    before = len(read_timeline(tmp_path))
    retry = sh(prefect("flow-run", "retry", str(flow_run_id)), env)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        retried = wait_final(client, flow_run_id, after_run_count=run_count)
    assert retried.is_failed() and re.fullmatch(FAILED_TWO, retried.message or "")
    started_again = {s for s, what, _ in read_timeline(tmp_path)[before:] if what == "start"}
    assert started_again == {"fail-two.com"}  # the 3 others came from the cache

    before = len(read_timeline(tmp_path))
    resumed = sh(site_pipeline("submit", "--retry-failed", str(flow_run_id)), env)
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr  # fail-two still fails
    assert "running again 1: fail-two.com (failed)" in resumed.stdout
    assert "skipped 3 (succeeded): ok-one.com, ok-three.com, flaky-four.com" in (resumed.stdout)
    started_again = {s for s, what, _ in read_timeline(tmp_path)[before:] if what == "start"}
    assert started_again == {"fail-two.com"}


def cancel_a_run(server: str, env: dict[str, str], tmp_path: Path) -> None:
    """Cancelling a deployment run (UI or CLI) stops its pipelines: the worker sends the flow
    run's process SIGTERM, and no pipeline or grandchild survives."""
    (tmp_path / "hang").mkdir()
    hang_config = write_config(
        tmp_path / "hang", ["hang-x.com"], kill_grace_seconds=1, concurrency_tag="e2e"
    )
    started = sh(
        site_pipeline(
            "submit", "--site", "hang-x.com", "--param", f"config_path={hang_config}", "--no-watch"
        ),
        env,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    hang_id = UUID(started.stdout.split("(", 1)[1].split(")", 1)[0])
    pids = hanging_pids(tmp_path / "hang")
    cancel = sh(prefect("flow-run", "cancel", str(hang_id)), env)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        state = wait_final(client, hang_id)
    assert state.is_cancelled(), state
    assert wait_until_gone(pids, timeout=30) == []
