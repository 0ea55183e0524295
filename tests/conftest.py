"""Shared fixtures: an isolated PREFECT_HOME, one real Prefect API for the session,
configs that point at the fake pipeline, and timeline helpers.

The suite runs in pytest-xdist workers (`addopts` in pyproject.toml). Each worker is a
process of its own with everything below to itself: its PREFECT_HOME (a new temporary
folder), its session API (`prefect_api`, its own SQLite database on a free port), its
`tmp_path`s and the servers its tests start. A worker ends itself when the pytest that
started it is gone (`_end_with_the_controller`), so a killed pytest leaves none behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.timeline import Row
from tests.support.timeline import read_timeline as read_rows

# Isolate Prefect before it is imported anywhere: no user profile, no user database.
_HOME = tempfile.mkdtemp(prefix="site-pipeline-tests-")
os.environ["PREFECT_HOME"] = _HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILE", None)
os.environ.pop("SITE_PIPELINE_CONFIG", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "support" / "fakes" / "fake_pipeline.py"


@pytest.fixture(scope="session", autouse=True)
def no_kept_server_outlives_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A run on the embedded default may keep a local server (`local_server_idle`), on
    purpose detached: at the session's end, stop those of this session's homes."""
    yield
    from tests.support.processes import stop_keepers

    for folder in (tmp_path_factory.getbasetemp(), Path(_HOME)):
        stop_keepers(folder)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect API (a temporary server on SQLite) for the whole session; yields its URL."""
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.process import groups as procgroup

    tied: list[int] = []
    try:
        with prefect_test_harness(server_startup_timeout=120):
            # Its uvicorn process would outlive a SIGKILLed pytest (Prefect stops it only
            # at exit): the product's reaper kills it when we die
            # (tests/project/test_suite_cleanup.py).
            for pid in harness_server_pids():
                procgroup.reap_pid_on_exit(pid)
                tied.append(pid)
            yield str(get_current_settings().api.url)
    finally:
        for pid in tied:  # stopped by the harness: its number may be reused
            procgroup.forget_pid(pid)


def harness_server_pids() -> list[int]:
    """The session's `prefect_test_harness` server: this process's children that run
    Prefect's server app under uvicorn (Prefect's temporary server, started by the harness)."""
    import psutil

    found = []
    for child in psutil.Process().children():
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if "uvicorn" in argv and "prefect.server.api.server:create_app" in argv:
            found.append(child.pid)
    return found


def write_config(folder: Path, sites: list[str], **pipeline: Any) -> Path:
    """Write a config.yaml in `folder` that runs the fake pipeline for `sites`."""
    body: dict[str, Any] = {
        "sites": sites,
        "command": ["{python}", str(FAKE), "--site", "{site}", "--attempt", "{attempt}"],
        "default_flags": [],
        "retry_count": 1,
        "retry_delay": 0,
        "retry_jitter": 0,
        "kill_grace_seconds": 1,
        "timeout": 60,
        # The harness's history is shared by every test, and sites of the same name ran in
        # other tests: tests that assert an order other than the list's say so themselves.
        "order": "listed",
        "concurrency_tag": f"test-{folder.name}"[:60].replace("[", "-").replace("]", ""),
        # On the embedded default (no PREFECT_API_URL) a run keeps no local server after it
        # unless a test says otherwise: the kept local server is tests/ops/test_local_server.py's.
        "local_server_idle": 0,
        "env": {
            "FAKE_TIMELINE": str(folder / "timeline.tsv"),
            "FAKE_PIDS_DIR": str(folder),
        },
    }
    body.update(pipeline)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"pipeline": body}), encoding="utf-8")
    return path


def count_config_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The config files parsed from now on, one entry a parse: `parse_config` is patched
    where `read_config` looks it up (`flows.config.reading`), the one place a file is read."""
    from flows.config import reading

    reads: list[str] = []
    parse = reading.parse_config

    def counted(text: str, source: str = reading.DEFAULT_CONFIG) -> Any:
        reads.append(source)
        return parse(text, source)

    monkeypatch.setattr(reading, "parse_config", counted)
    return reads


def read_timeline(folder: Path) -> list[Row]:
    """(site, 'start'|'end', time) rows the fake pipeline wrote in `folder`, in time order."""
    return read_rows(folder / "timeline.tsv")


def cli_env(api_url: str) -> dict[str, str]:
    """Environment for a CLI subprocess that talks to the session's Prefect API."""
    return {**os.environ, "PREFECT_API_URL": api_url, "PYTHONPATH": str(ROOT)}


PYTHON = sys.executable


def cli_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`site-pipeline ARGV` in this process: its exit status, stdout and stderr."""
    from flows.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m flows ARGS` as a real subprocess from the project root, tied to this
    session (`tests.support.processes.run_tied`); output captured."""
    from tests.support.processes import run_tied

    return run_tied([PYTHON, "-m", "flows", *args], cwd=ROOT, env=env, timeout=timeout)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests are slow too: `pytest -m "not slow"` is the fast set. The slow tests
    go first, end-to-end ones first of all, so the workers are not left waiting on one long
    test at the end (a stable sort: the order within each kind is the files' order)."""
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)

    def kind(item: pytest.Item) -> int:
        if item.get_closest_marker("e2e"):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=kind)


def _end_with_the_controller(every: float = 0.2) -> None:
    """In a pytest-xdist worker: SIGKILL this process once its parent (the pytest that
    started it) is gone. A worker outlives a killed pytest otherwise, and so would what its
    test started; killed, its reaper ends those (`tests.support.processes.start_tied`)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(every)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="end-with-the-controller", daemon=True).start()


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _end_with_the_controller()
