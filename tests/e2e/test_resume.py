"""Interrupts, crashes and resumes of `site-pipeline run`, as a user meets them: a real CLI
process, real pipelines, a real Prefect API (the session's, or the embedded default)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from flows.ops import local_server_files
from tests.conftest import PYTHON, ROOT, cli_env, read_timeline, run_cli, write_config
from tests.support.processes import (
    hanging_pids,
    keepers_under,
    start_tied,
    stop_keepers,
    tie_keepers,
    wait_until_gone,
)
from tests.support.servers import seed_home
from tests.support.waiting import wait_for, wait_until

pytestmark = pytest.mark.e2e


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """`python -m flows ARGS`, tied to this session (`tests.support.processes.start_tied`)."""
    return start_tied(
        [PYTHON, "-m", "flows", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def embedded_env(home: Path) -> dict[str, str]:
    """No PREFECT_API_URL: each CLI process uses `home`'s local server on its SQLite
    database (started for it; with `local_server_idle: 0` it stops when the command ends),
    as on a new user's machine (one already migrated, `seed_home`: the first run's
    migrations are `tests/ops/test_server.py`'s and the quickstart test's to prove)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PREFECT_HOME": str(seed_home(home)), "PYTHONPATH": str(ROOT)}


def kept_server_port(home: Path) -> str | None:
    """The port of the local server kept for `home` (flows.ops.local_server), if one is up."""
    state = local_server_files.read_state(home)
    return str(state.port) if state is not None else None


def completed_sites_when(proc: subprocess.Popen[str], count: int, home: Path) -> list[str]:
    """Wait until the run's server (the local one of `home`) records `count` completed task
    runs; their names. (Asked of the server, not of the pipelines'
    timeline: a site is done for `--retry-failed` once Prefect has its Completed state.)"""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        port = kept_server_port(home)
        if port is not None:
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}/api/task_runs/filter",
                    json={"task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}},
                    timeout=10,
                )
            except httpx.TransportError:  # still starting
                response = None
            if response is not None and response.status_code == 200:
                if len(response.json()) >= count:
                    return sorted(t["name"] for t in response.json())
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} sites completed in 120 s")


def wait_until_started(folder: Path, sites: set[str]) -> None:
    """Wait until every one of `sites` has started its pipeline (each holds its slot then)."""

    def started() -> bool:
        return sites <= {site for site, what, _ in read_timeline(folder) if what == "start"}

    assert wait_for(started, timeout=60), f"{sorted(sites)} did not all start in 60 s"


def cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def descendants(pid: int) -> list[int]:
    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def server_processes(home: Path) -> list[int]:
    """The keeper of `home`'s local server and every process under it (the server)."""
    found = []
    for keeper in keepers_under(home):
        try:
            found += [keeper.pid, *(child.pid for child in keeper.children(recursive=True))]
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_cancels_the_run_and_the_summary_is_still_written(
    tmp_path: Path, prefect_api: str, sig: signal.Signals
) -> None:
    """Ctrl-C or SIGTERM: the running sites and the waiting one end `cancelled` (Cancelled in
    the UI, not Failed), the finished one keeps its result, the table and --summary-json
    are still written, the exit status is 130 or 143, and no pipeline is left."""
    config = write_config(tmp_path, ["ok-a", "hang-b", "hang-c", "ok-d"], max_concurrent_sites=2)
    summary_path = tmp_path / "summary.json"
    proc = start_cli(
        ["run", "--config", str(config), "--summary-json", str(summary_path)],
        cli_env(prefect_api),
    )
    pids = hanging_pids(tmp_path, 2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err[-3000:]
    assert f"{sig.name}: cancelling" in err and "Traceback" not in err
    assert "Cancelled: 1/4 succeeded, 0 failed, 0 timed out, 3 cancelled" in out
    summary = json.loads(summary_path.read_text())
    assert summary["state"] == "Cancelled"
    assert {s["site"]: s["status"] for s in summary["sites"]} == {
        "ok-a": "succeeded",
        "hang-b": "cancelled",
        "hang-c": "cancelled",
        "ok-d": "cancelled",
    }
    assert summary["sites"][1]["error"] == f"cancelled by {sig.name}"
    assert wait_until_gone(pids, timeout=20) == []

    run_id = summary["flow_run_id"]
    flow_run = httpx.get(f"{prefect_api}/flow_runs/{run_id}", timeout=10).json()
    assert flow_run["state"]["type"] == "CANCELLED"
    task_runs = httpx.post(
        f"{prefect_api}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [run_id]}}},
        timeout=10,
    ).json()
    assert {t["name"]: t["state"]["type"] for t in task_runs} == {
        "ok-a": "COMPLETED",
        "hang-b": "CANCELLED",
        "hang-c": "CANCELLED",
        "ok-d": "CANCELLED",
    }


def test_sigterm_on_the_embedded_default_leaves_no_server(tmp_path: Path) -> None:
    """With no PREFECT_API_URL and `local_server_idle: 0` the run starts a local Prefect
    server (its keeper's): after SIGTERM it is gone with the pipelines, and every other
    process the run started."""
    home = tmp_path / "home"
    config = write_config(tmp_path, ["hang-a"])
    proc = start_cli(["run", "--config", str(config)], embedded_env(home))
    pids = hanging_pids(tmp_path, 1)
    tie_keepers(home)
    server = server_processes(home)
    assert any("prefect" in cmdline(p) and "server" in cmdline(p) for p in server)
    ours = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-3000:]
    assert wait_until_gone(pids + ours + server, timeout=30) == []


@pytest.mark.parametrize("command", ["history", "submit", "setup", "doctor"])
def test_a_killed_command_leaves_no_server(tmp_path: Path, command: str) -> None:
    """Every command that uses the API on the embedded default, with no server up, starts
    one with no idle time: SIGKILLed once that server answers, it leaves none behind (its
    keeper sees the command's process gone and stops it). (Left to Prefect, a temporary
    server outlived `submit | head -1`: its atexit never ran.)"""
    home = tmp_path / "home"
    config = write_config(tmp_path, ["ok-a"])
    args = {"setup": ["--config", str(config)], "doctor": ["--config", str(config)]}
    proc = start_cli([command, *args.get(command, [])], embedded_env(home))

    def answering() -> list[int]:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        port = kept_server_port(home)  # written once the server answers
        return server_processes(home) if port is not None else []

    servers = wait_until(answering, f"{command}'s local server answering", every=0.02)
    tie_keepers(home)
    proc.kill()
    proc.wait()  # not communicate(): a server left behind would hold its pipes open
    assert wait_until_gone(servers, timeout=30) == []


def test_crash_then_retry_failed_runs_only_the_rest_on_the_embedded_default(
    tmp_path: Path,
) -> None:
    """`kill -9` of the run when 2 of 6 sites are done leaves no pipeline; `doctor` names
    the dead run and the 2 slots it held (exit 1), `doctor --fix` marks it Crashed and gives
    them back (or the next run would wait for ever at this cap); `run --retry-failed last`
    runs only the other 4, skips the 2 with their earlier outcome, and all 6 succeed, none
    twice. Afterwards `doctor` finds nothing (exit 0). All on the local server the first run
    kept (`local_server_idle`), which outlives the killed run on purpose: one server start,
    not five (a killed command on a server with no idle time leaves none: the tests above)."""
    sites = ["ok-1", "ok-2", "slow-3", "slow-4", "slow-5", "slow-6"]
    config = write_config(tmp_path, sites, max_concurrent_sites=2, local_server_idle=300)
    env = embedded_env(tmp_path / "home")
    try:
        crash_then_retry_failed(tmp_path, sites, config, env)
    finally:
        stop_keepers(tmp_path)


def crash_then_retry_failed(
    tmp_path: Path, sites: list[str], config: Path, env: dict[str, str]
) -> None:
    proc = start_cli(["run", "--config", str(config)], env)
    done = completed_sites_when(proc, count=2, home=tmp_path / "home")  # ok-1, ok-2
    wait_until_started(tmp_path, {"slow-3", "slow-4"})  # they hold the 2 slots
    tie_keepers(tmp_path)
    kept = {p.pid for k in keepers_under(tmp_path) for p in [k, *k.children(recursive=True)]}
    assert kept  # the keeper, its server and its reaper: they outlive the run on purpose
    ours = [pid for pid in descendants(proc.pid) if pid not in kept]
    proc.kill()
    proc.communicate(timeout=30)
    assert done == ["ok-1", "ok-2"]
    assert wait_until_gone(ours, timeout=30) == []  # pipelines, the reaper

    doctor = run_cli(["doctor", "--config", str(config)], env, timeout=120)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "server version: 3." in doctor.stdout
    assert f"limit 'test-{tmp_path.name}'"[:70] in doctor.stdout
    assert ": 2 (matches the config), 2 slot(s) in use" in doctor.stdout
    assert "is Running but its process" in doctor.stdout
    assert "would give back 2 of 2 slot(s)" in doctor.stdout
    fixed = run_cli(["doctor", "--config", str(config), "--fix"], env, timeout=120)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "gave back 2 of 2 slot(s)" in fixed.stdout and "gone; Crashed" in fixed.stdout

    summary_path = tmp_path / "resumed.json"
    resumed = run_cli(
        ["run", "--retry-failed", "last", "--summary-json", str(summary_path)], env, timeout=240
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-3000:]
    assert f"skipped 2 (succeeded): {', '.join(done)}" in resumed.stdout
    assert re.search(
        r"running again 4: slow-3 \(.+\), slow-4 \(.+\), slow-5 \(.+\), slow-6", (resumed.stdout)
    ), resumed.stdout
    summary = json.loads(summary_path.read_text())
    status = {s["site"]: s["status"] for s in summary["sites"]}
    assert status == {site: "skipped" if site in done else "succeeded" for site in sites}
    assert summary["state"] == "Completed" and summary["counts"]["skipped"] == 2
    assert all("succeeded in flow run" in s["error"] for s in summary["sites"] if s["site"] in done)

    rows = read_timeline(tmp_path)
    ends = [site for site, what, _ in rows if what == "end"]
    assert sorted(ends) == sorted(sites)  # every site succeeded exactly once
    for site in done:  # and the ones done before the crash never ran again
        assert [what for s, what, _ in rows if s == site] == ["start", "end"]

    healthy = run_cli(["doctor", "--config", str(config)], env, timeout=120)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "no flow runs left Running by a dead process" in healthy.stdout
