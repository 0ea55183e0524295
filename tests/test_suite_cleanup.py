"""The test suite cleans up after itself (issue 23): when a pytest run is SIGKILLed (as a time
limit does), the `prefect server start` that a test started (`tests.servers.prefect_server`)
and the session's `prefect_test_harness` server are gone soon after, with everything they
started."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import PYTHON, ROOT
from tests.processes import alive

pytestmark = pytest.mark.slow

INNER = """
import os
import time
from pathlib import Path

import psutil

from tests.conftest import prefect_api  # noqa: F401  (the session's harness)
from tests.servers import prefect_server
from flows._prefect_compat import temporary_server


def tree(pid):
    proc = psutil.Process(pid)
    return [pid] + [child.pid for child in proc.children(recursive=True)]


def test_holds_servers_until_killed(prefect_api, tmp_path):
    harness = temporary_server().server_process.pid
    with prefect_server(tmp_path / "server", startup_timeout=240):
        (server,) = [
            child
            for child in psutil.Process().children(recursive=True)
            if "server" in child.cmdline() and "start" in child.cmdline()
        ]
        pgid = os.getpgid(server.pid)
        pids = tree(server.pid) + tree(harness)
        Path(os.environ["CLEANUP_OUT"]).write_text(f"{pgid} " + " ".join(map(str, pids)))
        time.sleep(600)
"""


def group_members(pgid: int) -> list[int]:
    """The live processes of the process group `pgid`."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and alive(proc.pid):
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def describe(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:200]
    except psutil.Error:
        return "?"


def test_a_sigkilled_pytest_leaves_no_server_behind(tmp_path: Path) -> None:
    """A pytest whose test holds a `prefect server start` and the session's harness server is
    SIGKILLed once both answer: within 15 s no process of the server's group, of its
    children or of the harness's server is left."""
    (tmp_path / "test_inner.py").write_text(INNER, encoding="utf-8")
    out = tmp_path / "pids"
    env = {**os.environ, "CLEANUP_OUT": str(out), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    pytest_proc = subprocess.Popen(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the SIGKILL below is for pytest alone, not its group
    )
    pgid, pids, left = 0, [], {}
    try:
        deadline = time.monotonic() + 300
        while not out.exists() or not out.read_text():
            assert pytest_proc.poll() is None, "the inner pytest ended before its servers ran"
            assert time.monotonic() < deadline, "the servers never answered"
            time.sleep(0.5)
        pgid, *pids = (int(word) for word in out.read_text().split())
        assert pgid != pytest_proc.pid and len(pids) >= 2
        os.kill(pytest_proc.pid, signal.SIGKILL)
        pytest_proc.wait(timeout=10)
        killed_at = time.monotonic()
        while (group_members(pgid) or any(alive(pid) for pid in pids)) and (
            time.monotonic() - killed_at < 15
        ):
            time.sleep(0.2)
        left = {
            pid: describe(pid) for pid in set(group_members(pgid)) | {p for p in pids if alive(p)}
        }
    finally:
        for pid in [pytest_proc.pid, *pids]:  # whatever is left, so this run leaks nothing
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if pgid:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    assert left == {}, f"still running 15 s after pytest was killed: {left}"
