"""A stop never depends on the polite way (issue 45): when the tree can't be asked to end
(Ctrl-Break fails wherever the flow's process has no console on Windows: Task Scheduler's
"run whether user is logged on or not", a service, a detached process, Wine), it is killed
at once, the outcome is recorded as usual, and nothing is left.

The failure is forced here, on Linux, with the tree backend's `_ask_to_end` raising what
Windows raises (WinError 6, "The handle is invalid"); under Wine it fails by itself
(tests/process/test_trees_windows.py). The keeper's stop of its server is held to the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest

from flows.ops import keeper
from flows.process import control as process_control
from flows.process import trees as proctree
from flows.process.attempt import run_attempt
from tests.conftest import FAKE
from tests.support.processes import alive, hanging_pids, wait_until_gone

GRACE = 30.0  # a grace the stop must not wait out: with no way to ask, it kills at once


def no_console() -> Exception:
    """What `Popen.send_signal(CTRL_BREAK_EVENT)` raises on CPython 3.11 for Windows when
    there is no console to send it from: a SystemError whose cause is the OSError (WinError
    6, or 12 under Wine); os.kill loses track of the error it set."""
    error = SystemError("<built-in function kill> returned a result with an exception set")
    error.__cause__ = OSError(6, "The handle is invalid")
    return error


@pytest.fixture(params=["OSError", "SystemError"])
def no_ctrl_break(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The tree backend's polite ask fails, as Ctrl-Break does with no console (the OSError,
    or what CPython 3.11 raises instead); yields the list each failed ask is counted in."""
    asked: list[int] = []
    error = OSError(6, "The handle is invalid") if request.param == "OSError" else no_console()

    def fails(tree: object, procs: Sequence[psutil.Process]) -> None:
        asked.append(len(procs))
        raise error

    monkeypatch.setattr(proctree, "_ask_to_end", fails)
    return asked


def fake(site: str) -> list[str]:
    return [sys.executable, str(FAKE), "--site", site, "--attempt", "1"]


def test_a_timeout_whose_ctrl_break_fails_still_stops_the_tree_at_once(
    tmp_path: Path, no_ctrl_break: list[int]
) -> None:
    """A timed-out pipeline and its grandchild: the ask fails, the attempt is still ended as
    `timed_out` (nothing raised), without waiting out the grace, and no process is left."""
    started = time.monotonic()
    outcome = run_attempt(
        fake("hang.com"),
        cwd=tmp_path,
        env={**os.environ, "FAKE_PIDS_DIR": str(tmp_path)},
        timeout=1.0,
        kill_grace=GRACE,
        log=lambda _: None,
        control=process_control.control_for("tree"),
    )
    elapsed = time.monotonic() - started
    pipeline, grandchild = hanging_pids(tmp_path, timeout=10)
    assert no_ctrl_break, "the polite ask was never tried"
    assert outcome.status == "timed_out"
    assert outcome.error == "timed out after 1 s: hanging"
    assert outcome.exit_code == -9  # killed, not asked
    assert not alive(pipeline) and not alive(grandchild)
    assert elapsed < GRACE / 3  # 1 s timeout + start-up; the grace was not waited out


def test_a_cancel_whose_ctrl_break_fails_still_stops_every_tree(
    tmp_path: Path, no_ctrl_break: list[int]
) -> None:
    """Ctrl-C / cancel: `stop_everything` for the flow run's owner (what the flow calls once
    its `StopRequest` is set) ends two running attempts whose ask fails, one of them
    ignoring SIGTERM: at once, each attempt returns its outcome (nothing raised), and no
    process is left."""
    outcomes: list[str] = []

    def one(site: str) -> None:
        folder = tmp_path / site
        folder.mkdir()
        outcome = run_attempt(
            fake(site),
            cwd=folder,
            env={**os.environ, "FAKE_PIDS_DIR": str(folder)},
            timeout=120,
            kill_grace=GRACE,
            log=lambda _: None,
            control=process_control.control_for("tree"),
            owner="flow-run-1",
        )
        outcomes.append(outcome.status)

    threads = [threading.Thread(target=one, args=(site,)) for site in ("hang-a", "stubborn-b")]
    for thread in threads:
        thread.start()
    pids = [pid for site in ("hang-a", "stubborn-b") for pid in hanging_pids(tmp_path / site)]
    started = time.monotonic()
    stopped = process_control.stop_everything("tree", GRACE, owner="flow-run-1")
    elapsed = time.monotonic() - started
    for thread in threads:
        thread.join(timeout=30)
    assert len(stopped) == 2 and len(no_ctrl_break) >= 2
    assert elapsed < GRACE / 3
    assert wait_until_gone(pids, timeout=10) == []
    assert len(outcomes) == 2  # each attempt returned its outcome: none raised


def test_the_keeper_stops_its_server_at_once_when_it_cannot_ask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`keeper.stop_server`: when the polite signal can't be sent (Ctrl-Break from a
    detached keeper on Windows; forced here), the server and its child are killed at once,
    not after `STOP_GRACE`."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time;"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)']);"
            "print('up', flush=True); time.sleep(1000)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert server.stdout is not None and server.stdout.readline() == b"up\n"
    tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    assert len(tree) == 2

    def cannot_send(*args: object) -> None:
        raise no_console()

    monkeypatch.setattr(keeper.os, "killpg", cannot_send)
    monkeypatch.setattr(keeper, "STOP_GRACE", GRACE)
    started = time.monotonic()
    keeper.stop_server(server)
    elapsed = time.monotonic() - started
    monkeypatch.undo()
    assert elapsed < GRACE / 3
    assert wait_until_gone([p.pid for p in tree], timeout=10) == []
