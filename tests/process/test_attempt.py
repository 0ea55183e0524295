"""The process runner: real subprocesses, no Prefect server. Every test runs on both process
control backends (`group` and `tree`), and `tree` also with the Windows pipe reader."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from flows.process import attempt as runner
from flows.process import control as process_control
from flows.process import groups as procgroup
from flows.process import output, procfs
from flows.process.attempt import MAX_LINE_BYTES, AttemptOutcome, BoundedLog, run_attempt
from tests.conftest import FAKE
from tests.support.processes import READY, alive, hanging_pids, spawned_in_group, wait_until_gone


@pytest.fixture(autouse=True, params=["group", "tree", "tree-threads"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The process-control backend (and pipe reader) every run_attempt here uses. Tests
    marked `no_output` are about stopping processes, where the reader plays no part: they
    run on `group` and `tree` only."""
    if request.param == "tree-threads" and request.node.get_closest_marker("no_output"):
        pytest.skip("the pipe reader plays no part here (tree covers the backend)")
    kind = "tree" if request.param.startswith("tree") else "group"
    monkeypatch.setattr(runner, "control_for", lambda _: process_control.control_for(kind))
    if request.param == "tree-threads":
        monkeypatch.setattr(output, "READER", "threads")
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
    # without a log file: no path, and nothing that could be missing from one
    assert (outcome.log_path, outcome.log_complete) == (None, True)


def test_failure_keeps_the_stderr_tail(tmp_path: Path) -> None:
    """A non-zero exit is a failure with its exit code and its stderr lines; its last stderr
    line is the cause, in the error too."""
    outcome = attempt(fake("fail.com", 2), tmp_path)
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert outcome.error == "exit code 1: fail.com: boom on attempt 2"
    assert outcome.stderr_tail == ["fail.com: boom on attempt 2"]
    assert outcome.result is None


def test_the_stderr_tail_is_the_last_ten_lines_and_a_signal_death_says_which(
    tmp_path: Path,
) -> None:
    """Of 25 stderr lines the last 10 are kept; a pipeline killed by a signal is a failure
    with the negative exit code and the signal's number; the duration is measured."""
    script = (
        "import os, signal, sys, time\n"
        "for n in range(25):\n"
        "    print(f'problem {n}', file=sys.stderr, flush=True)\n"
        "time.sleep(0.3); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    outcome = attempt([sys.executable, "-c", script], tmp_path)
    assert outcome.stderr_tail == [f"problem {n}" for n in range(15, 25)]
    assert outcome.status == "failed" and outcome.exit_code == -9
    assert outcome.error == "killed by signal 9: problem 24"
    assert 0.3 <= outcome.duration_s < 15


def test_a_program_that_cannot_start_is_reported_not_raised(tmp_path: Path) -> None:
    """A missing executable gives status not_started and a clear error."""
    program = str(tmp_path / "no-such-program")
    outcome = attempt([program], tmp_path, timeout=5)
    assert outcome.status == "not_started" and outcome.exit_code is None
    assert outcome.error == f"could not start {program!r}: No such file or directory"
    assert 0 <= outcome.duration_s < 5


@pytest.mark.no_output
@pytest.mark.parametrize("site", ["hang.com", "stubborn.com"])
def test_timeout_kills_the_pipeline_and_its_grandchild(tmp_path: Path, site: str) -> None:
    """On timeout the whole group is stopped (SIGKILL if SIGTERM is ignored): no process remains."""
    started = time.monotonic()
    outcome = attempt(fake(site), tmp_path, timeout=1.5, kill_grace=0.5)
    elapsed = time.monotonic() - started
    pipeline, grandchild = hanging_pids(tmp_path, timeout=10)
    assert outcome.status == "timed_out" and outcome.ending == "timed_out"
    assert outcome.error == "timed out after 1.5 s: hanging"
    if site.startswith("stubborn"):  # SIGTERM ignored: SIGKILL came after the grace
        assert elapsed >= 1.5 + 0.5 - 0.05
        assert outcome.exit_code == -9
    else:
        assert outcome.exit_code == -15
    assert not alive(pipeline) and not alive(grandchild)
    assert elapsed < 15  # generous: 1.5 s timeout + 0.5 s grace + start-up
    assert not procgroup.group_alive(pipeline)


@pytest.mark.no_output
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


def test_what_a_grandchild_holding_the_pipes_prints_as_it_is_stopped_is_logged(
    tmp_path: Path,
) -> None:
    """A pipeline exits 0 and leaves a grandchild that holds stdout open: the grandchild is
    stopped after the pipeline's end, and the line it prints on SIGTERM is still read (what
    is left in the pipes is read once more after the stop, when the pipeline had exited)."""
    armed = tmp_path / "armed"
    child = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        "    print('grandchild stopped', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        f"open({str(armed)!r}, 'w').close()\n"
        "time.sleep(1000)\n"
    )
    script = (
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        f"while not os.path.exists({str(armed)!r}): time.sleep(0.01)\n"
        "time.sleep(1); print('pipeline done', flush=True)\n"
    )
    lines: list[str] = []
    outcome = attempt([sys.executable, "-c", script], tmp_path, log=lines.append)
    assert outcome.status == "succeeded"
    assert lines[-2:] == ["pipeline done", "grandchild stopped"]


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


def test_by_default_the_first_and_last_200_lines_are_logged(tmp_path: Path) -> None:
    """Without `max_log_lines`, the config's default (200) bounds the live log: of 450
    lines, the first 200 as they come, a note of the 50 left out, then the last 200."""
    script = "for n in range(450): print(f'line {n}')"
    lines: list[str] = []
    outcome = attempt([sys.executable, "-c", script], tmp_path, log=lines.append)
    assert (outcome.lines_total, outcome.lines_not_logged) == (450, 50)
    assert lines[:200] == [f"line {n}" for n in range(200)]
    assert lines[200].startswith("... 50 output lines not logged")
    assert lines[201:] == [f"line {n}" for n in range(250, 450)]


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
    """An exception raised into the waiting thread (Prefect's backstop: its `CancelledError`,
    an `asyncio.CancelledError`, so a BaseException) still stops the group. (Not
    `TimeoutError`: that is an OSError, and landing inside a read of /proc, whose
    `except OSError` means "that process is gone", it was swallowed there, and the attempt
    went on waiting for its 600 s timeout: a red run in CI at 42377d1.)"""
    import asyncio
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
        ctypes.c_long(thread.ident), ctypes.py_object(asyncio.CancelledError)
    )
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert errors and isinstance(errors[0], asyncio.CancelledError)
    assert not alive(pipeline) and not alive(grandchild)


@pytest.mark.no_output
def test_crash_of_the_parent_leaves_no_pipeline_behind(tmp_path: Path, backend: str) -> None:
    """If the process that started a pipeline is SIGKILLed, the reaper stops the pipeline and
    its grandchild (a whole group, or each tracked process of a tree)."""
    import signal

    code = (
        "import os, sys, time; sys.path.insert(0, sys.argv[1]); "
        "from flows.process import attempt as runner, output; "
        "from flows.process.control import control_for; "
        "output.READER = 'threads' if sys.argv[2] == 'tree-threads' else output.READER; "
        "runner.run_attempt(sys.argv[4:], cwd=sys.argv[3], env=os.environ, timeout=600, "
        "kill_grace=1, log=print, control=control_for(sys.argv[2].split('-')[0]))"
    )
    project = Path(__file__).resolve().parents[2]
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


@pytest.mark.no_output
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
    can see the child (flows.process.trees says so), and it keeps stdout and stderr open, silent.
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


# -- Details a mutation test found unobserved (issue 12) --------------------------------------


def test_output_that_comes_over_time_is_all_logged_in_order(tmp_path: Path) -> None:
    """Lines printed a while apart, on both pipes, are all logged in order: a pipe is at its
    end only when it says so, not after its first chunk."""
    script = (
        "import sys, time\n"
        "for n in range(3):\n"
        "    print(f'out {n}', flush=True); time.sleep(0.15)\n"
        "    print(f'err {n}', file=sys.stderr, flush=True); time.sleep(0.15)\n"
        "print('{\"done\": true}', flush=True)\n"
    )
    lines: list[str] = []
    outcome = attempt([sys.executable, "-c", script], tmp_path, log=lines.append)
    assert lines == [
        "out 0",
        "[stderr] err 0",
        "out 1",
        "[stderr] err 1",
        "out 2",
        "[stderr] err 2",
        '{"done": true}',
    ]
    assert outcome.result == {"done": True}
    assert outcome.stderr_tail == ["err 0", "err 1", "err 2"]


def test_a_reader_that_stalls_loses_no_output(tmp_path: Path) -> None:
    """While we are slow to take lines (the first log call takes a second), the pipeline's
    small writes pile up in the pipe and the reader's queue; none is dropped."""
    script = (
        "import time\n"
        "for n in range(600):\n"
        "    print(n, flush=True); time.sleep(0.001)\n"
        "print('{\"last\": 599}', flush=True)\n"
    )
    calls: list[str] = []

    def log(line: str) -> None:
        calls.append(line)
        if len(calls) == 1:
            time.sleep(1)

    outcome = attempt([sys.executable, "-c", script], tmp_path, log=log)
    assert outcome.status == "succeeded"
    assert outcome.lines_total == 601
    assert outcome.result == {"last": 599}


@pytest.mark.no_output
def test_stop_all_stops_only_that_owners_pipelines_and_each_once(
    tmp_path: Path, backend: str
) -> None:
    """`stop_all(owner=...)` (a cancelled flow run) stops that owner's pipelines only and
    returns their ids; one already stopped, by `stop_all` or `stop`, is not returned again."""
    control = runner.control_for("auto")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    first = control.spawn(sleeper, cwd=tmp_path, env=os.environ, owner="run-a")
    second = control.spawn(sleeper, cwd=tmp_path, env=os.environ, owner="run-b")
    try:
        assert control.stop_all(0.5, owner="run-a") == [first.pid]
        assert wait_until_gone([first.pid], timeout=10) == []
        assert alive(second.pid)
        assert control.stop_all(0.5, owner="run-a") == []
        control.stop(second, 0.5)
        assert not alive(second.pid)
        assert control.stop_all(0.5, owner="run-b") == []
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()
            proc.stderr.close()


def test_reader_threads_never_block_exit_and_end_with_their_pipes(
    tmp_path: Path, backend: str
) -> None:
    """The thread reader (Windows): its two threads are daemons (a process that escaped and
    holds the pipes can't keep us from exiting), and once that process ends, so do they,
    even if it wrote more than the queue holds after we stopped reading."""
    if backend != "tree-threads":
        pytest.skip("only the thread reader has threads")
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    script = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    end = time.monotonic() + 1.5\n"
        "    while time.monotonic() < end:\n"
        "        sys.stdout.buffer.write(b'x' * 65536); sys.stdout.buffer.flush()\n"
        "    os._exit(0)\n"
        "os._exit(0)\n"
    )
    before = set(threading.enumerate())
    outcome = attempt([sys.executable, "-c", script], tmp_path, timeout=60, kill_grace=0.5)
    assert outcome.status == "succeeded"
    readers = [t for t in set(threading.enumerate()) - before if t.name.startswith("pipe-")]
    assert sorted(t.name for t in readers) == ["pipe-stderr", "pipe-stdout"]
    assert all(t.daemon for t in readers)
    for thread in readers:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in readers)


def test_reader_threads_end_after_a_timeout_that_cut_a_flood(tmp_path: Path, backend: str) -> None:
    """A pipeline that floods stdout and ignores SIGTERM times out: while it is stopped
    nobody reads, so the queue fills up; the reader threads still end once it is killed
    (a reader waiting for room in the queue forever would leak a thread per attempt)."""
    if backend != "tree-threads":
        pytest.skip("only the thread reader has threads")
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "while True:\n"
        "    sys.stdout.buffer.write(b'x' * 65536); sys.stdout.buffer.flush()\n"
    )
    before = set(threading.enumerate())
    outcome = attempt([sys.executable, "-c", script], tmp_path, timeout=1, kill_grace=1)
    assert outcome.status == "timed_out"
    readers = [t for t in set(threading.enumerate()) - before if t.name.startswith("pipe-")]
    for thread in readers:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in readers)


@contextlib.contextmanager
def odd_named_process(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A pipeline (its own group) that renamed itself `x) Z 1 1 1`, as /proc/<pid>/stat
    would show it inside its parentheses; stopped and its pipes closed at the end."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc (Linux)")
    script = (
        "import ctypes, time\n"
        "ctypes.CDLL(None).prctl(15, b'x) Z 1 1 1', 0, 0, 0)  # PR_SET_NAME\n"
        + READY
        + "time.sleep(60)\n"
    )
    with spawned_in_group(script, tmp_path) as proc:
        yield proc


def test_a_member_whose_name_holds_a_parenthesis_keeps_its_group_alive(tmp_path: Path) -> None:
    """/proc/<pid>/stat puts the name in parentheses; a name with ') ' in it must not shift
    the fields: the group is alive while that member runs, and gone after it is stopped."""
    with odd_named_process(tmp_path) as proc:
        assert psutil.Process(proc.pid).name().startswith("x) Z")
        assert procgroup.group_alive(proc.pid)
    assert not procgroup.group_alive(proc.pid)


def test_the_pipeline_runs_in_the_folder_it_is_given(tmp_path: Path) -> None:
    """`cwd` reaches the process: the pipeline's working folder is the one asked for."""
    folder = tmp_path / "work"
    folder.mkdir()
    lines: list[str] = []
    outcome = attempt(
        [sys.executable, "-c", "import os; print(os.getcwd())"], folder, log=lines.append
    )
    assert outcome.status == "succeeded"
    assert lines == [str(folder.resolve())]


@pytest.mark.no_output
def test_stop_all_gives_the_grace_then_returns_once_all_are_gone(
    tmp_path: Path, backend: str
) -> None:
    """A pipeline that takes 0.5 s to clean up on SIGTERM finishes its cleanup within the
    grace (no early SIGKILL), and stop_all returns soon after, not at the end of the grace."""
    control = runner.control_for("auto")
    done = tmp_path / "cleaned-up"
    script = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        f"    time.sleep(0.5); open({str(done)!r}, 'w').close(); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    proc = control.spawn([sys.executable, "-c", script], cwd=tmp_path, env=os.environ, owner="o")
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        started = time.monotonic()
        assert control.stop_all(20, owner="o") == [proc.pid]
        assert time.monotonic() - started < 10
        assert done.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.no_output
def test_by_default_a_pipeline_leads_a_process_group_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no backend given, run_attempt uses `auto`: on POSIX a process group (and session)
    of the pipeline's own, so a signal to our group never reaches it by accident."""
    if not procgroup.supported():
        pytest.skip("no POSIX process groups here")
    monkeypatch.setattr(runner, "control_for", process_control.control_for)  # no fixture
    lines: list[str] = []
    script = "import os; print(os.getpgid(0) == os.getpid() != os.getpgid(os.getppid()))"
    outcome = attempt([sys.executable, "-c", script], tmp_path, log=lines.append)
    assert outcome.status == "succeeded" and lines == ["True"]


@pytest.mark.no_output
def test_stop_all_by_owner_ends_a_running_attempt(tmp_path: Path) -> None:
    """run_attempt registers its pipeline under `owner`: stop_all(owner) from another thread
    (a cancelled flow run) ends it, and the attempt reports how it ended."""
    outcomes: list[AttemptOutcome] = []
    thread = threading.Thread(
        target=lambda: outcomes.append(
            attempt(fake("hang.com"), tmp_path, timeout=120, kill_grace=0.5, owner="run-x")
        )
    )
    thread.start()
    pipeline, grandchild = hanging_pids(tmp_path, timeout=10)
    time.sleep(0.5)  # the tree backends see the grandchild at their next watch
    assert runner.control_for("auto").stop_all(0.5, owner="run-x") == [pipeline]
    thread.join(timeout=30)
    assert outcomes and outcomes[0].status == "failed" and outcomes[0].exit_code == -15
    assert wait_until_gone([pipeline, grandchild], timeout=15) == []


@pytest.mark.no_output
def test_the_reaper_stops_what_we_registered_when_its_pipe_from_us_closes(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What our death looks like to the reaper, without dying: its stdin from us closes. It
    then stops every pipeline and tracked process we registered. It runs in a session of its
    own (a Ctrl-C to our terminal doesn't end it), keeps none of our output pipes open, and is
    not restarted by each registration; the next registration after its end starts a new one.
    (A registry of its own: the session's reaper also holds the test servers,
    tests/support/servers.py, which this pretended death must not end.)"""
    monkeypatch.setattr(procgroup, "_registry", procgroup._Registry())
    control = runner.control_for("auto")
    first = control.spawn(fake("hang-1.com"), cwd=tmp_path, env=env_for(tmp_path))
    pids = hanging_pids(tmp_path, 1, timeout=10)
    time.sleep(0.5)
    control.watch(first)  # the tree backends register the grandchild now
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    second = control.spawn(sleeper, cwd=tmp_path, env=os.environ)
    held = procgroup._registry._reaper  # (the reaper, the pid that started it)
    assert held is not None
    reaper = held[0]
    try:
        assert reaper.poll() is None
        assert all(alive(pid) for pid in pids)  # a second registration did not reap the first
        assert os.getsid(reaper.pid) == reaper.pid != os.getsid(0)
        if sys.platform.startswith("linux"):
            assert os.readlink(f"/proc/{reaper.pid}/fd/1") == "/dev/null"
            assert os.readlink(f"/proc/{reaper.pid}/fd/2") == "/dev/null"
        assert reaper.stdin is not None
        reaper.stdin.close()
        reaper.wait(timeout=15)
        assert wait_until_gone([*pids, second.pid], timeout=15) == []
        third = control.spawn(sleeper, cwd=tmp_path, env=os.environ)
        held = procgroup._registry._reaper
        assert held is not None and held[0] is not reaper
        control.stop(third, 0.5)
    finally:
        for proc in (first, second):
            control.stop(proc, 0.5)  # and forget it
        held = procgroup._registry._reaper
        last = None if held is None else held[0]
        if last is not None and last.stdin is not None:
            last.stdin.close()  # this test's reaper ends with it (nothing is registered now)
            last.wait(timeout=15)


def test_the_start_time_told_to_the_reaper_is_the_kernels_even_for_odd_names(
    tmp_path: Path,
) -> None:
    """The reaper tells a process from a later one with the same pid by its start time:
    `procfs.start_time` gives the kernel's (in clock ticks since boot, as psutil reads it), also
    for a process named with ') ', and "" for a pid that doesn't exist."""
    with odd_named_process(tmp_path) as odd:
        ticks = os.sysconf("SC_CLK_TCK")
        for pid in (os.getpid(), odd.pid):
            expected = (psutil.Process(pid).create_time() - psutil.boot_time()) * ticks
            assert abs(int(procfs.start_time(pid)) - expected) <= 2
        assert procfs.start_time(2**22 + 1) == ""  # above Linux's pid_max
