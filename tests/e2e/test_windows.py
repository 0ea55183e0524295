"""`site-pipeline run` end to end on a real Windows CPython (issue 45), started with no
console at all (`DETACHED_PROCESS`: as Task Scheduler's "run whether user is logged on or
not" or a service starts it, where Ctrl-Break can't be sent), against a Prefect server.

In .ci/run's Windows lane (Wine) the server runs on the Linux side (.ci/windows_lane.py) and
`SITE_PIPELINE_TEST_API_URL` names it (loopback is shared; Prefect's own server takes about
40 s to answer under Wine); elsewhere (windows-latest) the test starts `prefect server start`
itself. Four sites: one succeeds, one fails, one times out with a grandchild, one is retried.
"""

from __future__ import annotations

import json
import locale
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from flows.process import trees as proctree
from tests.conftest import FAKE, ROOT, write_config
from tests.support.processes import hanging_pids, wait_until_gone
from tests.support.waiting import wait_until

pytestmark = [
    pytest.mark.windows,
    pytest.mark.slow,
    pytest.mark.skipif(
        sys.platform != "win32",
        reason="Windows only: runs in .ci/run's Windows lane (Wine) and on windows-latest",
    ),
]

API_URL_VARIABLE = "SITE_PIPELINE_TEST_API_URL"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Prefect API the run talks to: the lane's (Linux side), else a server started here."""
    given = os.environ.get(API_URL_VARIABLE)
    if given:
        assert _healthy(given), f"{API_URL_VARIABLE}={given} does not answer"
        yield given
        return
    home = tmp_path_factory.mktemp("server-home")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (home / "server.log").open("ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env={**os.environ, "PREFECT_HOME": str(home)},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    proctree.end_with_us(server.pid)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_until(lambda: _healthy(url), f"the Prefect server at {url}", timeout=180, every=0.5)
        yield url
    finally:
        for proc in [*psutil.Process(server.pid).children(recursive=True)]:
            proc.kill()
        server.kill()
        server.wait()
        log.close()


def test_a_detached_run_of_four_sites_ends_as_it_should_and_leaves_nothing(
    tmp_path: Path, api_url: str
) -> None:
    """Exit code 1 (one site failed); the summary: ok.com succeeded, fail.com failed,
    hang.com timed out (3 s) and its grandchild stopped, flaky.com succeeded on its second
    attempt; no pipeline process is left, the timed-out tree included."""
    config = write_config(
        tmp_path,
        [
            "ok.com",
            {"site": "fail.com", "retry_count": 1},
            {"site": "hang.com", "timeout": 3, "retry_count": 1},
            "flaky.com",
        ],
        retry_count=2,
        kill_grace_seconds=30,  # not waited out: Ctrl-Break can't be sent from no console
        concurrency_tag=f"windows-e2e-{os.getpid()}",
    )
    summary = tmp_path / "summary.json"
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(ROOT),
    }
    started = time.monotonic()
    run = subprocess.Popen(
        [sys.executable, "-m", "flows", "run", "--config", str(config),
         "--summary-json", str(summary)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        creationflags=subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP,
    )  # fmt: skip
    proctree.end_with_us(run.pid)  # a failing test leaves no run behind
    try:
        output, _ = run.communicate(timeout=420)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    elapsed = time.monotonic() - started
    text = output.decode(locale.getpreferredencoding(False), errors="replace")
    print(f"site-pipeline run took {elapsed:.1f} s:\n{text!a}")
    assert run.returncode == 1, text
    result = json.loads(summary.read_text(encoding="utf-8"))
    by_site = {site["site"]: site for site in result["sites"]}
    assert {s: (by_site[s]["status"], by_site[s]["attempts"]) for s in by_site} == {
        "ok.com": ("succeeded", 1),
        "fail.com": ("failed", 1),
        "hang.com": ("timed_out", 1),
        "flaky.com": ("succeeded", 2),
    }
    assert result["counts"] | {"check_warnings": 0} == {
        "total": 4, "succeeded": 2, "failed": 1, "timed_out": 1, "cancelled": 0,
        "skipped": 0, "check_warnings": 0,
    }  # fmt: skip
    assert by_site["hang.com"]["error"].startswith("timed out after 3 s")
    assert by_site["fail.com"]["cause"] == "fail.com: boom on attempt 1"
    pipeline, grandchild = hanging_pids(tmp_path, timeout=5)
    assert wait_until_gone([pipeline, grandchild], timeout=10) == []
    assert _fake_pipelines() == []


def _fake_pipelines() -> list[int]:
    """Processes still running the fake pipeline, as psutil sees them (on Wine too)."""
    left = []
    for proc in psutil.process_iter():
        try:
            if str(FAKE) in " ".join(proc.cmdline()):
                left.append(proc.pid)
        except psutil.Error:
            continue
    return left
