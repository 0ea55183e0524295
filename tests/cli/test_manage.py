"""The CLI as a real subprocess against the session's real Prefect API."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import PYTHON, ROOT, cli_env, read_timeline, run_cli, write_config
from tests.support.processes import alive, hanging_pids, start_tied, wait_until_gone
from tests.support.timeline import max_overlap


def cli(args: list[str], api: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_cli(args, cli_env(api), timeout)


@pytest.mark.slow  # a CLI process running a flow
def test_run_exits_0_when_every_site_succeeds(tmp_path: Path, prefect_api: str) -> None:
    """All sites succeed: exit 0, a final table, and the summary JSON in its documented shape."""
    config = write_config(tmp_path, ["ok-a", "ok-b"])
    summary_path = tmp_path / "summary.json"
    result = cli(["run", "--config", str(config), "--summary-json", str(summary_path)], prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Completed: 2/2 succeeded" in result.stdout
    summary = json.loads(summary_path.read_text())
    assert summary["state"] == "Completed" and summary["counts"]["succeeded"] == 2
    # PREFECT_API_URL was set, so the run went to that server, not a temporary one.
    response = httpx.get(f"{prefect_api}/flow_runs/{summary['flow_run_id']}", timeout=10)
    assert response.status_code == 200 and response.json()["state"]["type"] == "COMPLETED"
    assert [s["site"] for s in summary["sites"]] == ["ok-a", "ok-b"]


@pytest.mark.slow  # a CLI process running a flow
def test_run_exits_1_when_a_site_fails(tmp_path: Path, prefect_api: str) -> None:
    """One failing site: the others still run, and the exit status is 1."""
    config = write_config(tmp_path, ["ok-a", "fail-b"])
    result = cli(
        ["run", "--config", str(config), "--site", "fail-b", "--site", "ok-c"], prefect_api
    )
    assert result.returncode == 1, result.stderr[-3000:]
    # fail-b fails in other tests on this server too: its streak may come first
    assert "1 of 2 sites failed: " in result.stderr
    assert "1 \N{MULTIPLICATION SIGN} fail-b: boom on attempt" in result.stderr
    assert {row[0] for row in read_timeline(tmp_path)} == {"fail-b", "ok-c"}  # --site overrides


def test_run_exits_2_on_bad_config_and_runs_nothing(tmp_path: Path, prefect_api: str) -> None:
    """A bad config exits 2 with one line naming the key; no pipeline starts."""
    config = write_config(tmp_path, ["ok-a"], timeout=-5)
    result = cli(["run", "--config", str(config)], prefect_api)
    assert result.returncode == 2
    assert "pipeline.timeout = -5" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "timeline.tsv").exists()


@pytest.mark.slow  # a CLI process running a flow
def test_sites_file_and_sequential_flags(tmp_path: Path, prefect_api: str) -> None:
    """--sites-file reads sites (relative to the cwd) and --sequential runs them one by one."""
    config = write_config(tmp_path, ["ignored"])
    (tmp_path / "list.txt").write_text("# nightly\nok-1\nok-2\nok-3\n")
    result = cli(
        [
            "run",
            "--config",
            str(config),
            "--sites-file",
            str(tmp_path / "list.txt"),
            "--sequential",
        ],
        prefect_api,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_timeline(tmp_path)
    assert [r[0] for r in rows if r[1] == "start"] == ["ok-1", "ok-2", "ok-3"]
    assert max_overlap(rows) == 1


def test_console_script_is_installed() -> None:
    """`pip install -e .` gives a `site-pipeline` command next to the interpreter."""
    script = Path(sys.executable).parent / "site-pipeline"
    assert script.exists()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "validate" in result.stdout


@pytest.mark.slow
def test_two_concurrent_flow_runs_share_the_cap(tmp_path: Path, prefect_api: str) -> None:
    """Two flow runs started together with the same tag never run more than the cap (3) at once."""
    timeline = tmp_path / "timeline.tsv"
    procs = []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(
            folder,
            [f"ok-{name}-{i}" for i in range(6)],
            max_concurrent_sites=3,
            concurrency_tag="shared-cap-test",
            env={"FAKE_TIMELINE": str(timeline), "FAKE_SLEEP": "1.5"},
        )
        procs.append(
            start_tied(
                [PYTHON, "-m", "flows", "run", "--config", str(config)],
                cwd=ROOT,
                env=cli_env(prefect_api),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
    rows = read_timeline(tmp_path)
    assert len(rows) == 24
    assert max_overlap(rows) == 3
    # 12 sites of 1.5 s through 3 shared slots need at least 4 rounds of 1.5 s.
    assert rows[-1][2] - rows[0][2] >= 4 * 1.5


@pytest.mark.parametrize("argv", [["validate"], ["--help"]])
def test_python_dash_m_flows_is_the_same_cli(argv: list[str], prefect_api: str) -> None:
    """`python -m flows` runs the CLI: validate on the shipped config exits 0."""
    result = cli(argv, prefect_api, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("control", ["group", "tree"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_flow_process_leaves_no_pipeline(
    tmp_path: Path, prefect_api: str, sig: signal.Signals, control: str
) -> None:
    """Ctrl-C, SIGTERM (what a worker sends to cancel) or SIGKILL of a running flow process:
    every pipeline and grandchild it started is gone soon after, on both backends."""
    config = write_config(
        tmp_path,
        ["hang-a", "hang-b"],
        max_concurrent_sites=2,
        kill_grace_seconds=1,
        process_control=control,
    )
    proc = start_tied(
        [PYTHON, "-m", "flows", "run", "--config", str(config)],
        cwd=ROOT,
        env=cli_env(prefect_api),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    pids = hanging_pids(tmp_path, 2)
    assert all(alive(pid) for pid in pids)
    time.sleep(0.5)  # the tree backend learns of each grandchild at its next watch (0.2 s)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert wait_until_gone(pids, timeout=20) == []
    if sig != signal.SIGKILL:
        assert proc.returncode != 0


def test_history_tables_put_each_value_in_its_column() -> None:
    """`history` (plain, for pipes): runs and sites, each value under its own header."""
    from flows.ops import format_history

    data = {
        "api": "http://x/api",
        "runs": [
            {
                "flow_run_id": "1",
                "name": "brave-fox",
                "start_time": "2026-11-28T02:00:00+00:00",
                "state": "Failed",
                "duration_s": 61.25,
                "succeeded": 5,
                "failed": 2,
            }
        ],
        "sites": [
            {
                "site": "a.com",
                "last_status": "timed_out",
                "last_run_at": "2026-11-28T02:00:01+00:00",
                "last_succeeded_at": None,
            }
        ],
    }
    lines = format_history(data).splitlines()
    assert lines[0] == "Last 1 site-pipeline runs (http://x/api):"
    header, row = lines[1].split(), lines[2].split()
    assert header == ["STARTED", "STATE", "SECONDS", "OK", "FAILED", "NAME"]
    assert row == ["2026-11-28", "02:00:00", "Failed", "61.2", "5", "2", "brave-fox"]
    site_header, site_row = lines[4].split(), lines[5].split()
    assert site_header == ["SITE", "LAST", "STATUS", "LAST", "RUN", "LAST", "SUCCEEDED"]
    assert site_row == ["a.com", "timed_out", "2026-11-28", "02:00:01", "never"]
