"""The test suite cleans up after itself: when a pytest run with pytest-xdist workers is
SIGKILLed (as a time limit does), every process its tests started is gone within 10 s: a
`prefect server start` (`tests.support.servers.prefect_server`), a `site-pipeline run` with its
pipeline (`tests.support.processes.start_tied`), the session's `prefect_test_harness` server, and
the workers themselves."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import PYTHON, ROOT
from tests.support.processes import alive, start_tied, stop_tied
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

INNER = """
import os
import subprocess
import time
from pathlib import Path

import psutil

from tests.conftest import PYTHON, ROOT, cli_env, harness_server_pids, write_config
from tests.support.processes import hanging_pids, start_tied
from tests.support.servers import prefect_server

OUT = Path(os.environ["CLEANUP_OUT"])


def tree(pid):
    return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]


def hold(name, pids):
    (OUT / name).write_text(" ".join(map(str, pids)))
    time.sleep(600)  # until the outer test kills this pytest


def test_holds_a_prefect_server(tmp_path):
    with prefect_server(tmp_path / "server", startup_timeout=240):
        (server,) = [
            child
            for child in psutil.Process().children(recursive=True)
            if "server" in child.cmdline() and "start" in child.cmdline()
        ]
        hold("server", [os.getpid(), *tree(server.pid)])


def test_holds_a_cli_run(prefect_api, tmp_path):
    config = write_config(tmp_path, ["hang-a"])
    proc = start_tied(
        [PYTHON, "-m", "flows", "run", "--config", str(config)],
        cwd=ROOT,
        env=cli_env(prefect_api),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pipeline = hanging_pids(tmp_path)
    (harness,) = harness_server_pids()
    hold("cli", [os.getpid(), *tree(proc.pid), *pipeline, *tree(harness)])
"""


def describe(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:200]
    except psutil.Error:
        return "?"


def test_a_sigkilled_pytest_leaves_nothing_behind(tmp_path: Path) -> None:
    """A `pytest -n 2` whose workers hold a `prefect server start`, a `site-pipeline run`
    with a hanging pipeline, and the session's harness server is SIGKILLed once all of them
    run: within 10 s none of those processes is left, nor either worker."""
    (tmp_path / "test_inner.py").write_text(INNER, encoding="utf-8")
    out = tmp_path / "held"
    out.mkdir()
    env = {**os.environ, "CLEANUP_OUT": str(out), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    inner = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest"]
    pytest_proc = start_tied(
        [*inner, "-n", "2", "test_inner.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids: list[int] = []
    try:

        def held() -> list[int] | None:
            assert pytest_proc.poll() is None, "the inner pytest ended before its tests held"
            files = [out / "server", out / "cli"]
            if not all(f.exists() and f.read_text() for f in files):
                return None
            return [int(word) for f in files for word in f.read_text().split()]

        pids = wait_until(held, "the inner tests hold their processes", timeout=300, every=0.2)
        workers = [p.pid for p in psutil.Process(pytest_proc.pid).children()]
        assert len(workers) == 2 and set(workers) <= set(pids)  # each test ran in a worker
        os.kill(pytest_proc.pid, signal.SIGKILL)  # pytest alone, not its process group
        pytest_proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid: describe(pid) for pid in pids if alive(pid)}
    finally:
        stop_tied(pytest_proc, grace=1)  # whatever is left, so this run leaks nothing
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    assert left == {}, f"still running 10 s after pytest was killed: {left}"
