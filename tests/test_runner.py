"""The process runner: real subprocesses, no Prefect server. Every test runs on both process
control backends (`group` and `tree`), and `tree` also with the Windows pipe reader."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from flows import process_control, procgroup, runner
from flows.runner import MAX_LINE_BYTES, AttemptOutcome, BoundedLog, run_attempt
from tests.conftest import FAKE
from tests.processes import alive, hanging_pids, wait_until_gone


@pytest.fixture(autouse=True, params=["group", "tree", "tree-threads"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The process-control backend (and pipe reader) every run_attempt here uses."""
    kind = "tree" if request.param.startswith("tree") else "group"
    monkeypatch.setattr(runner, "control_for", lambda _: process_control.control_for(kind))
    if request.param == "tree-threads":
        monkeypatch.setattr(runner, "READER", "threads")
    return str(request.param)


def fake(site: str, attempt: int = 1) -> list[str]:
    return [sys.executable, str(FAKE), "--site", site, "--attempt", str(attempt)]


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "FAKE_PIDS_DIR": str(tmp_path), **extra}


def attempt(
    argv: list[str],
    tmp_path: Path,
    *,
    timeout: float = 30,
    kill_grace: float = 1,
    env: Mapping[str, str] | None = None,
    log: Callable[[str], None] = lambda _: None,
    **more: Any,
) -> AttemptOutcome:
    """run_attempt in `tmp_path`, with the fake pipeline's environment; output not kept."""
    return run_attempt(
        argv,
        cwd=tmp_path,
        env=env_for(tmp_path) if env is None else env,
        timeout=timeout,
        kill_grace=kill_grace,
        log=log,
        **more,
    )


def test_success_captures_the_json_result_line(tmp_path: Path) -> None:
    """Exit 0 is success, and a JSON object on the last stdout line becomes the result."""
    lines: list[str] = []
    outcome = attempt(fake("ok.com"), tmp_path, log=lines.append)
    assert outcome.status == "succeeded" and outcome.exit_code == 0
    assert outcome.result is not None and outcome.result["site"] == "ok.com"
    assert any('"site": "ok.com"' in line for line in lines)


def test_failure_keeps_the_stderr_tail(tmp_path: Path) -> None:
    """A non-zero exit is a failure with its exit code and its stderr lines."""
    outcome = attempt(fake("fail.com", 2), tmp_path)
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert outcome.stderr_tail == ["fail.com: boom on attempt 2"]
    assert outcome.result is None


def test_a_program_that_cannot_start_is_reported_not_raised(tmp_path: Path) -> None:
    """A missing executable gives status not_started and a clear error."""
    outcome = attempt([str(tmp_path / "no-such-program")], tmp_path, timeout=5)
    assert outcome.status == "not_started"
    assert outcome.error is not None and "could not start" in outcome.error


@pytest.mark.parametrize("site", ["hang.com", "stubborn.com"])
def test_timeout_kills_the_pipeline_and_its_grandchild(tmp_path: Path, site: str) -> None:
    """On timeout the whole group is stopped (SIGKILL if SIGTERM is ignored): no process remains."""
    started = time.monotonic()
    outcome = attempt(fake(site), tmp_path, timeout=1.5, kill_grace=0.5)
    elapsed = time.monotonic() - started
    pipeline, grandchild = hanging_pids(tmp_path, timeout=10)
    assert outcome.status == "timed_out"
    if site.startswith("stubborn"):  # SIGTERM ignored: SIGKILL came after the grace
        assert elapsed >= 1.5 + 0.5 - 0.05
    assert not alive(pipeline) and not alive(grandchild)
    assert elapsed < 15  # generous: 1.5 s timeout + 0.5 s grace + start-up
    assert not procgroup.group_alive(pipeline)


def test_background_grandchild_is_stopped_after_a_normal_exit(tmp_path: Path) -> None:
    """A pipeline that exits 0 but leaves a background process behind gets it cleaned up.
    (It runs on for a second after starting it: the tree backends see a child at their next
    watch, every 0.2 s; one started and orphaned faster is the documented escape, tested
    below.)"""
    script = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)']); "
        f"open({str(tmp_path / 'bg.pid')!r}, 'w').write(str(p.pid)); time.sleep(1); "
        "print('done')"
    )
    outcome = attempt([sys.executable, "-c", script], tmp_path)
    assert outcome.status == "succeeded"
    assert not alive(int((tmp_path / "bg.pid").read_text()))


def test_20mb_of_output_is_bounded_in_logs_and_memory(tmp_path: Path) -> None:
    """20 MB of output: the attempt succeeds, logs stay about 2N lines, memory stays small."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lines: list[str] = []
    outcome = attempt(
        fake("loud.com"),
        tmp_path,
        env=env_for(tmp_path, FAKE_LOUD_MB="20"),
        timeout=120,
        log=lines.append,
        max_log_lines=50,
    )
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert outcome.status == "succeeded"
    assert outcome.lines_total > 200_000
    assert len(lines) <= 2 * 50 + 1
    assert any("output lines not logged" in line for line in lines)
    assert outcome.result is not None and outcome.result["site"] == "loud.com"
    assert grown_mb < 100, f"peak RSS grew by {grown_mb:.0f} MB"


def test_overlong_lines_are_cut(tmp_path: Path) -> None:
    """A single 1 MB line is logged cut to MAX_LINE_BYTES, and the next line still arrives."""
    script = "import sys; sys.stdout.write('y' * 1_000_000 + '\\nafter\\n')"
    lines: list[str] = []
    outcome = attempt([sys.executable, "-c", script], tmp_path, log=lines.append)
    assert outcome.status == "succeeded"
    assert lines[0].endswith("[line cut]") and len(lines[0]) < MAX_LINE_BYTES + 20
    assert lines[1] == "after"


def test_bounded_log_keeps_first_and_last_lines() -> None:
    """BoundedLog logs the first N live, then says how many it left out, then the last N."""
    out: list[str] = []
    log = BoundedLog(out.append, 3)
    for i in range(10):
        log.add(str(i))
    log.close()
    assert out == [
        "0",
        "1",
        "2",
        "... 4 output lines not logged (only the first and last 3 are kept) ...",
        "7",
        "8",
        "9",
    ]


def test_interrupting_the_wait_stops_the_group(tmp_path: Path) -> None:
    """An exception raised into the waiting thread (Prefect's backstop) still stops the group."""
    import ctypes
    import threading

    errors: list[BaseException] = []

    def target() -> None:
        try:
            attempt(fake("hang.com"), tmp_path, timeout=600, kill_grace=0.5)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    pipeline, grandchild = hanging_pids(tmp_path, timeout=10)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_long(thread.ident), ctypes.py_object(TimeoutError)
    )
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert errors and isinstance(errors[0], TimeoutError)
    assert not alive(pipeline) and not alive(grandchild)


def test_crash_of_the_parent_leaves_no_pipeline_behind(tmp_path: Path, backend: str) -> None:
    """If the process that started a pipeline is SIGKILLed, the reaper stops the pipeline and
    its grandchild (a whole group, or each tracked process of a tree)."""
    import signal
    import subprocess

    code = (
        "import os, sys, time; sys.path.insert(0, sys.argv[1]); from flows import runner; "
        "from flows.process_control import control_for; "
        "runner.READER = 'threads' if sys.argv[2] == 'tree-threads' else runner.READER; "
        "runner.run_attempt(sys.argv[4:], cwd=sys.argv[3], env=os.environ, timeout=600, "
        "kill_grace=1, log=print, control=control_for(sys.argv[2].split('-')[0]))"
    )
    project = Path(__file__).resolve().parent.parent
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(project), backend, str(tmp_path), *fake("hang.com")],
        # The parent runs in the project folder (under mutmut, its mutated copy, whose
        # pyproject.toml mutmut's trampoline reads); the pipeline runs in tmp_path.
        cwd=project,
        env=env_for(tmp_path),
    )
    pipeline, grandchild = hanging_pids(tmp_path, timeout=10)
    time.sleep(0.5)  # the tree backend sees the grandchild at its next watch (0.2 s)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert wait_until_gone([pipeline, grandchild], timeout=15) == []


def test_without_process_groups_auto_is_tree_and_group_refuses_clearly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where POSIX process groups don't exist (native Windows), `auto` is the tree backend,
    and asking for `group` is a clear error, never a silent failure."""
    monkeypatch.setattr(procgroup.os, "name", "nt")
    assert process_control.control_for("auto").name == "tree"
    with pytest.raises(process_control.UnsupportedControl, match="no POSIX process groups"):
        process_control.control_for("group")
    with pytest.raises(procgroup.UnsupportedPlatform, match="POSIX process group"):
        procgroup.ensure_supported()


# -- What a hostile pipeline can do to us ----------------------------------------------------


def test_a_setsid_daemon_that_ignores_sigterm_is_stopped_too(tmp_path: Path) -> None:
    """A pipeline that starts a child in a session of its own (`setsid`: it leaves the
    process group, so a group kill misses it) that also ignores SIGTERM: the child is seen
    while the attempt runs and killed at the end (SIGKILL after the grace)."""
    if not hasattr(os, "setsid"):
        pytest.skip("no setsid on this platform")
    daemon = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)"
    script = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {daemon!r}], start_new_session=True); "
        f"open({str(tmp_path / 'daemon.pid')!r}, 'w').write(str(p.pid)); time.sleep(1000)"
    )
    outcome = attempt([sys.executable, "-c", script], tmp_path, timeout=2, kill_grace=0.5)
    daemon_pid = int((tmp_path / "daemon.pid").read_text())
    assert outcome.status == "timed_out"
    assert wait_until_gone([daemon_pid], timeout=10) == []


def test_a_pipeline_that_closes_stdout_and_stderr_is_still_timed_out(tmp_path: Path) -> None:
    """Closing both pipes is not the end of the pipeline: it is waited for, and stopped at
    the timeout like any other."""
    script = "import os, time; os.close(1); os.close(2); time.sleep(1000)"
    started = time.monotonic()
    outcome = attempt([sys.executable, "-c", script], tmp_path, timeout=1.5, kill_grace=0.5)
    assert outcome.status == "timed_out"
    assert 1.4 < time.monotonic() - started < 15


def test_a_process_that_escapes_and_holds_the_pipes_does_not_hang_the_attempt(
    tmp_path: Path,
) -> None:
    """A pipeline that forks a child into a session of its own and exits at once: no watch
    can see the child (flows.proctree says so), and it keeps stdout and stderr open, silent.
    The attempt still ends, with the pipeline's own status, within a few seconds (closing a
    pipe that a reader thread is blocked on used to wait for the child: forever)."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    pid_file = tmp_path / "escaped.pid"
    script = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print('pipeline done', flush=True)\n"
        "os._exit(0)\n"
    )
    started = time.monotonic()
    try:
        outcome = attempt([sys.executable, "-c", script], tmp_path, timeout=60, kill_grace=0.5)
        assert time.monotonic() - started < 20
        assert outcome.status == "succeeded"
    finally:
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        escaped = int(pid_file.read_text())
        if alive(escaped):
            os.kill(escaped, 9)
        assert wait_until_gone([escaped], timeout=10) == []


@pytest.mark.slow  # about 20 s per backend
def test_a_gigabyte_without_a_newline_is_cut_and_memory_stays_bounded(tmp_path: Path) -> None:
    """1 GB on stdout with no newline, then a result line: the attempt succeeds, the log
    gets one line cut to MAX_LINE_BYTES that says so, the result is still read, and this
    process's peak memory grows by far less than the output."""
    script = (
        "import sys; chunk = b'x' * (1 << 20)\n"
        "for _ in range(1024): sys.stdout.buffer.write(chunk)\n"
        "sys.stdout.buffer.write(b'\\n{\"records\": 7}\\n')"
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lines: list[str] = []
    outcome = attempt([sys.executable, "-c", script], tmp_path, timeout=300, log=lines.append)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert outcome.status == "succeeded", outcome.error
    assert lines[0].endswith("[line cut]") and len(lines[0]) < MAX_LINE_BYTES + 20
    assert outcome.result == {"records": 7}
    assert grown_mb < 100, f"peak RSS grew by {grown_mb:.0f} MB"
