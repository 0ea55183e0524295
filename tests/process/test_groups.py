"""POSIX process groups (`flows.process.groups`): starting a pipeline in a group of its own,
stopping the group, telling whether it is alive, and the registry mirrored to the reaper.
Real processes throughout; each test that registers anything has a registry (and reaper)
of its own."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flows.process import groups as procgroup
from flows.process import procfs
from tests.support.processes import READY, alive, spawned_in_group, wait_until_gone

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="POSIX groups, read through Linux's /proc"
)

SLEEPER = "import time\n" + READY + "time.sleep(60)\n"
IGNORES_TERM = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + READY
IGNORES_TERM += "time.sleep(60)\n"


def cleans_up(marker: Path) -> str:
    """A pipeline that takes 0.1 s on SIGTERM to clean up, then writes the time it is done
    (`time.monotonic()`, the same clock as ours) to `marker` and exits 0."""
    return (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        "    time.sleep(0.1)\n"
        f"    open({str(marker)!r}, 'w').write(repr(time.monotonic())); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n" + READY + "time.sleep(60)\n"
    )


def leaves_a_grandchild() -> str:
    """A pipeline that starts a sleeper in its group, prints the sleeper's pid and exits 0."""
    return (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
    )


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> bool:
    """Whether `condition` holds within `timeout` seconds (checked every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[procgroup._Registry]:
    """A registry of the test's own in place of the module's (whose reaper also holds the
    session's test servers); at the end its reaper's input is closed and the reaper waited
    for (nothing is registered by then, so it exits at once)."""
    fresh = procgroup._Registry()
    monkeypatch.setattr(procgroup, "_registry", fresh)
    yield fresh
    held = fresh._reaper
    if held is not None:
        reaper = held[0]
        if reaper.stdin is not None and not reaper.stdin.closed:
            reaper.stdin.close()
        reaper.wait(timeout=30)


@pytest.fixture
def bystander() -> Iterator[int]:
    """The pid of a sleeper of the test's own, to register with a reaper: never this
    process, which a reaper would end if a failing test left it registered."""
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=True)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_groups_are_supported_where_there_is_posix_and_killpg(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`supported()` holds on Linux, and not where `os.name` isn't posix (killpg present or
    not) or where os has no killpg."""
    assert procgroup.supported()
    with monkeypatch.context() as patch:
        patch.setattr(procgroup.os, "name", "nt")
        assert not procgroup.supported()
    with monkeypatch.context() as patch:
        patch.delattr(procgroup.os, "killpg")
        assert not procgroup.supported()
    assert procgroup.supported()


def test_ensure_supported_raises_only_where_groups_are_missing_and_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`ensure_supported` passes here; without groups it raises `UnsupportedPlatform`
    naming the platform and where to run instead."""
    procgroup.ensure_supported()
    monkeypatch.setattr(procgroup.os, "name", "nt")
    with pytest.raises(procgroup.UnsupportedPlatform) as raised:
        procgroup.ensure_supported()
    assert str(raised.value) == (
        f"site-pipeline runs each pipeline in its own POSIX process group, which "
        f"{sys.platform!r} does not have; run it on Linux or macOS (or WSL on Windows)"
    )


def test_on_windows_every_group_operation_raises_unsupported_platform(
    monkeypatch: pytest.MonkeyPatch, registry: procgroup._Registry
) -> None:
    """Where `sys.platform` is win32, `group_alive`, signalling a group, `exited`,
    `stop_group` and `stop_all` raise `UnsupportedPlatform` telling to use the tree backend,
    before touching any process."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    calls: list[Callable[[], object]] = [
        lambda: procgroup.group_alive(done.pid),
        lambda: procgroup._signal_group(done.pid, 0),
        lambda: procgroup.exited(done),
        lambda: procgroup.stop_group(done, 1),
        lambda: procgroup.stop_all(1),
    ]
    monkeypatch.setattr(procgroup.sys, "platform", "win32")
    for call in calls:
        with pytest.raises(procgroup.UnsupportedPlatform) as raised:
            call()
        assert str(raised.value) == procgroup._NO_GROUPS
        assert "use process_control: tree" in str(raised.value)


def test_spawn_starts_a_session_leader_in_its_folder_with_only_what_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: procgroup._Registry
) -> None:
    """The pipeline leads a new session and group (not ours), runs in `cwd` with exactly
    `env`, reads /dev/null rather than our stdin, inherits no other descriptor of ours (not
    even an inheritable one), and its stdout and stderr come back through pipes."""
    monkeypatch.setenv("GROUPS_TEST_OURS", "ours")
    env = {k: v for k, v in os.environ.items() if k != "GROUPS_TEST_OURS"}
    env["GROUPS_TEST_GIVEN"] = "given"
    script = (
        "import json, os, sys\n"
        "try:\n"
        "    os.fstat(int(sys.argv[1])); inherited = True\n"
        "except OSError:\n"
        "    inherited = False\n"
        "print(json.dumps({'pid': os.getpid(), 'pgid': os.getpgid(0), 'sid': os.getsid(0),\n"
        "    'cwd': os.getcwd(), 'given': os.environ.get('GROUPS_TEST_GIVEN'),\n"
        "    'ours': os.environ.get('GROUPS_TEST_OURS'), 'stdin': sys.stdin.read(),\n"
        "    'inherited': inherited}))\n"
        "print('on stderr', file=sys.stderr)\n"
    )
    keep_read, keep_write = os.pipe()
    os.set_inheritable(keep_write, True)
    stdin_read, stdin_write = os.pipe()
    os.write(stdin_write, b"our stdin")
    os.close(stdin_write)
    saved_stdin = os.dup(0)
    os.dup2(stdin_read, 0)
    try:
        proc = procgroup.spawn(
            [sys.executable, "-c", script, str(keep_write)], cwd=tmp_path, env=env
        )
    finally:
        os.dup2(saved_stdin, 0)
        for fd in (saved_stdin, stdin_read, keep_read, keep_write):
            os.close(fd)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        procgroup.stop_group(proc, 0.5)
    seen = json.loads(out)
    assert seen["pid"] == seen["pgid"] == seen["sid"] == proc.pid
    assert seen["pgid"] != os.getpgid(0)
    assert seen["cwd"] == str(tmp_path.resolve())
    assert (seen["given"], seen["ours"]) == ("given", None)
    assert seen["stdin"] == ""
    assert seen["inherited"] is False
    assert err == b"on stderr\n"
    assert proc.returncode == 0


def test_stop_all_stops_the_groups_of_one_owner_then_the_rest_once(
    tmp_path: Path, registry: procgroup._Registry
) -> None:
    """`stop_all(owner)` stops only that owner's groups and returns their ids; `stop_all()`
    then stops every other registered group (sorted ids); a stopped group is forgotten, so
    a third call stops nothing."""
    with (
        spawned_in_group(SLEEPER, tmp_path, owner="a") as a,
        spawned_in_group(SLEEPER, tmp_path, owner="b") as b,
        spawned_in_group(SLEEPER, tmp_path) as anyone,
    ):
        assert procgroup.stop_all(10, owner="a") == [a.pid]
        assert wait_until_gone([a.pid], timeout=10) == []
        assert alive(b.pid) and alive(anyone.pid)
        assert procgroup.stop_all(10) == sorted([b.pid, anyone.pid])
        assert wait_until_gone([b.pid, anyone.pid], timeout=10) == []
        assert procgroup.stop_all(10) == []


def test_stop_all_gives_the_grace_and_returns_as_soon_as_the_groups_are_gone(
    tmp_path: Path, registry: procgroup._Registry
) -> None:
    """A pipeline that needs 0.1 s to clean up on SIGTERM gets it (no early SIGKILL), and
    stop_all returns soon after it is done (its checks are 0.05 s apart), long before its
    30 s grace."""
    marker = tmp_path / "cleaned"
    with spawned_in_group(cleans_up(marker), tmp_path, owner="o") as proc:
        assert procgroup.stop_all(30, owner="o") == [proc.pid]
        returned = time.monotonic()
        assert returned - float(marker.read_text()) < 0.6
    assert proc.returncode == 0


def test_stop_group_gives_the_grace_and_returns_as_soon_as_the_group_is_gone(
    tmp_path: Path, registry: procgroup._Registry
) -> None:
    """`stop_group` sends SIGTERM, lets a pipeline that needs 0.1 s clean up (exit 0), and
    returns soon after it is done (its checks are 0.02 s apart), long before its 30 s grace;
    the leader is reaped, the group gone."""
    marker = tmp_path / "cleaned"
    with spawned_in_group(cleans_up(marker), tmp_path) as proc:
        procgroup.stop_group(proc, 30)
        returned = time.monotonic()
        assert proc.returncode == 0
        assert returned - float(marker.read_text()) < 0.6
        assert not procgroup.group_alive(proc.pid)
        assert procgroup.stop_all(1) == []  # forgotten


def test_stop_group_kills_a_group_that_ignores_sigterm_after_the_grace(
    tmp_path: Path, registry: procgroup._Registry
) -> None:
    """A leader and its child that both ignore SIGTERM are SIGKILLed once the grace has
    passed, not before; both are gone when stop_group returns."""
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', " + repr(IGNORES_TERM) + "],\n"
        "    stdout=subprocess.PIPE)\n"
        "assert child.stdout.readline() == b'ready\\n'\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = procgroup.spawn([sys.executable, "-c", script], cwd=tmp_path, env=os.environ)
    try:
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        started = time.monotonic()
        procgroup.stop_group(proc, 0.3)
        assert time.monotonic() - started >= 0.3
        assert proc.returncode == -signal.SIGKILL
        assert not alive(grandchild)
        assert not procgroup.group_alive(proc.pid)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def test_after_a_normal_exit_stop_group_ends_what_the_pipeline_left_behind(
    tmp_path: Path, registry: procgroup._Registry
) -> None:
    """A leader that exited (not reaped yet) leaves a sleeper in its group: the group is
    alive, and stop_group ends the sleeper, then reaps the leader (exit 0)."""
    with spawned_in_group(leaves_a_grandchild(), tmp_path) as proc:
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        assert wait_for(lambda: procgroup.exited(proc))
        assert procgroup.group_alive(proc.pid)
        procgroup.stop_group(proc, 5)
        assert proc.returncode == 0
        assert wait_until_gone([grandchild], timeout=10) == []


def test_once_the_leader_is_reaped_stop_group_leaves_its_old_group_alone(
    tmp_path: Path, registry: procgroup._Registry
) -> None:
    """After the leader was reaped its group id may belong to someone else: stop_group
    signals nothing (the sleeper left in the group lives on) and forgets the group."""
    proc = procgroup.spawn(
        [sys.executable, "-c", leaves_a_grandchild()], cwd=tmp_path, env=os.environ
    )
    assert proc.stdout is not None and proc.stderr is not None
    grandchild = int(proc.stdout.readline())
    try:
        proc.wait(timeout=30)
        procgroup.stop_group(proc, 0.5)
        assert alive(grandchild)
        assert procgroup.stop_all(0.5) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)
        proc.stdout.close()
        proc.stderr.close()
    assert wait_until_gone([grandchild], timeout=10) == []


def test_a_running_group_is_alive_and_left_running_by_the_check(
    tmp_path: Path, registry: procgroup._Registry
) -> None:
    """`group_alive` is true for a running group and signals nothing to it (the pipeline
    ends by stop_group's SIGTERM, not by the check); `exited` is false while it runs."""
    with spawned_in_group(SLEEPER, tmp_path) as proc:
        assert procgroup.group_alive(proc.pid)
        assert not procgroup.exited(proc)
        procgroup.stop_group(proc, 5)
        assert proc.returncode == -signal.SIGTERM
    assert not procgroup.group_alive(proc.pid)  # reaped: the group is gone


def test_a_group_of_zombies_is_not_alive_and_exited_does_not_reap_the_leader(
    tmp_path: Path, registry: procgroup._Registry
) -> None:
    """A leader that exited is a zombie until reaped: `exited` says so without reaping it
    (its pid stays taken), and on Linux its group no longer counts as alive."""
    with spawned_in_group("pass", tmp_path) as proc:
        assert wait_for(lambda: procgroup.exited(proc))
        fields = procfs.stat_fields(proc.pid)
        assert fields is not None and fields[procfs.STATE] == b"Z"
        assert proc.returncode is None
        assert not procgroup.group_alive(proc.pid)
    assert proc.returncode == 0
    assert procgroup.exited(proc)  # reaped


def test_a_group_we_may_not_signal_counts_as_alive(
    tmp_path: Path, registry: procgroup._Registry
) -> None:
    """A group whose members we may not signal (root's, seen from an unprivileged process)
    counts as alive: it may still hold what we started."""
    with spawned_in_group(SLEEPER, tmp_path) as proc:
        if os.geteuid() != 0:
            pytest.skip("needs root, to start a group an unprivileged process may not signal")
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # as nobody, ask about root's group
            try:
                os.close(read)
                os.setuid(65534)
                os.write(write, b"alive" if procgroup.group_alive(proc.pid) else b"gone")
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as answer:
            assert answer.read() == b"alive"
        assert os.waitpid(child, 0)[1] == 0


def test_elsewhere_a_zombie_leader_keeps_its_group_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: procgroup._Registry
) -> None:
    """Without /proc's view of zombies (not Linux), a group whose leader is an unreaped
    zombie counts as alive."""
    with spawned_in_group("pass", tmp_path) as proc:
        assert wait_for(lambda: procgroup.exited(proc))
        with monkeypatch.context() as patch:
            patch.setattr(procgroup.sys, "platform", "darwin")
            assert procgroup.group_alive(proc.pid)


def test_without_waitid_exited_reaps_the_leader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: procgroup._Registry
) -> None:
    """Where os has no waitid (macOS), `exited` is false while the leader runs and true
    once it ended, reaping it (its exit code is then known)."""
    with (
        spawned_in_group(SLEEPER, tmp_path) as running,
        spawned_in_group("pass", tmp_path) as quick,
    ):
        monkeypatch.delattr(procgroup.os, "waitid")
        assert not procgroup.exited(running)
        assert wait_for(lambda: procgroup.exited(quick))
        assert quick.returncode == 0


def reaper_of(registry: procgroup._Registry) -> subprocess.Popen[bytes]:
    """The registry's current reaper process."""
    held = registry._reaper  # (the reaper, the pid that started it)
    assert held is not None
    return held[0]


def test_the_registry_tells_the_reaper_every_registration_and_forgetting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: procgroup._Registry, bystander: int
) -> None:
    """What the reaper reads, line by line: `+pPID:START` and `-pPID` for single processes,
    `+PGID:START` and `-PGID` for groups (the start times the kernel's), a spawned
    pipeline's group when it starts and when stop_group ends it."""
    recorder = tmp_path / "recorder.py"
    recorder.write_text(
        "import sys\n"
        "with open(sys.argv[0] + '.lines', 'w') as out:\n"
        "    for line in sys.stdin:\n"
        "        out.write(line)\n"
    )
    monkeypatch.setattr(procgroup, "_REAPER_SCRIPT", recorder)
    with spawned_in_group(SLEEPER, tmp_path) as proc:
        group_start = procfs.start_time(proc.pid)
        procgroup.reap_pid_on_exit(bystander)
        procgroup.reap_group_on_exit(bystander)
        procgroup.forget_group(bystander)
        procgroup.forget_pid(bystander)
    pgid = proc.pid
    reaper = reaper_of(registry)
    assert reaper.stdin is not None
    reaper.stdin.close()
    assert reaper.wait(timeout=30) == 0
    its_start = procfs.start_time(bystander)
    assert its_start and group_start
    assert (tmp_path / "recorder.py.lines").read_text().splitlines() == [
        f"+{pgid}:{group_start}",
        f"+p{bystander}:{its_start}",
        f"+{bystander}:{its_start}",
        f"-{bystander}",
        f"-p{bystander}",
        f"-{pgid}",
    ]


def descriptors(pid: int) -> list[str]:
    """What the open descriptors of `pid` point at (one it closes while listed is left out)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.append(os.readlink(fd))
    return found


def test_one_reaper_serves_every_registration_in_a_session_of_its_own(
    tmp_path: Path, registry: procgroup._Registry, bystander: int
) -> None:
    """The reaper starts with the first registration and serves the next ones (not restarted
    each time); it leads a session of its own (a Ctrl-C to ours doesn't reach it), writes to
    /dev/null rather than our stdout and stderr, holds none of our other descriptors (not
    even an inheritable one), and once it has ended the next registration starts a new
    one."""
    keep_read, keep_write = os.pipe()
    os.set_inheritable(keep_write, True)
    ours = os.readlink(f"/proc/self/fd/{keep_write}")
    try:
        procgroup.reap_pid_on_exit(bystander)
        first = reaper_of(registry)
        assert ours not in descriptors(first.pid)
    finally:
        os.close(keep_read)
        os.close(keep_write)
    procgroup.forget_pid(bystander)
    assert reaper_of(registry) is first and first.poll() is None
    assert os.getsid(first.pid) == first.pid != os.getsid(0)
    assert os.readlink(f"/proc/{first.pid}/fd/1") == "/dev/null"
    assert os.readlink(f"/proc/{first.pid}/fd/2") == "/dev/null"
    assert first.stdin is not None
    first.stdin.close()
    assert first.wait(timeout=30) == 0
    procgroup.reap_pid_on_exit(bystander)
    second = reaper_of(registry)
    assert second is not first and second.poll() is None
    procgroup.forget_pid(bystander)


def test_the_reaper_runs_isolated_from_the_environments_python_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: procgroup._Registry, bystander: int
) -> None:
    """The reaper runs with `python -I`: a `sitecustomize` on our PYTHONPATH never runs in
    it (it would in a plain `python`)."""
    custom = tmp_path / "custom"
    custom.mkdir()
    ran = tmp_path / "sitecustomize-ran"
    (custom / "sitecustomize.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    monkeypatch.setenv("PYTHONPATH", str(custom))
    subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=30)
    assert ran.exists()  # the sitecustomize works where not isolated
    ran.unlink()
    procgroup.reap_pid_on_exit(bystander)
    procgroup.forget_pid(bystander)
    reaper = reaper_of(registry)
    assert reaper.stdin is not None
    reaper.stdin.close()
    assert reaper.wait(timeout=30) == 0
    assert not ran.exists()


def test_the_reaper_stops_what_was_registered_when_its_input_from_us_closes(
    tmp_path: Path, registry: procgroup._Registry
) -> None:
    """Our death as the reaper sees it: its stdin closes. It then ends a spawned pipeline's
    group and a single process given to `reap_pid_on_exit`."""
    sleeper = [sys.executable, "-c", SLEEPER]
    single = subprocess.Popen(sleeper, stdout=subprocess.PIPE, start_new_session=True)
    pipeline = procgroup.spawn(sleeper, cwd=tmp_path, env=os.environ)
    try:
        for proc in (single, pipeline):
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        procgroup.reap_pid_on_exit(single.pid)
        reaper = reaper_of(registry)
        assert reaper.stdin is not None
        reaper.stdin.close()
        assert single.wait(timeout=15) == -signal.SIGTERM
        assert pipeline.wait(timeout=15) == -signal.SIGTERM
        reaper.kill()  # done: spare its 5 s before the SIGKILL round
    finally:
        for proc in (single, pipeline):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert single.stdout is not None and pipeline.stdout is not None
        single.stdout.close()
        pipeline.stdout.close()
        assert pipeline.stderr is not None
        pipeline.stderr.close()


def test_a_reaper_that_stopped_reading_is_replaced_at_the_next_registration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: procgroup._Registry, bystander: int
) -> None:
    """A reaper still running but no longer reading (it closed its stdin after one byte): the
    registration
    that finds the pipe broken raises nothing, and the next one starts a new reaper."""
    deaf = tmp_path / "deaf.py"
    deaf.write_text("import os, time\nos.read(0, 1)\nos.close(0)\ntime.sleep(60)\n")
    monkeypatch.setattr(procgroup, "_REAPER_SCRIPT", deaf)
    started: list[subprocess.Popen[bytes]] = []
    try:
        procgroup.reap_pid_on_exit(bystander)
        first = reaper_of(registry)
        started.append(first)
        assert wait_for(lambda: not os.path.exists(f"/proc/{first.pid}/fd/0"))
        procgroup.forget_pid(bystander)  # finds the pipe broken
        assert first.poll() is None
        procgroup.reap_pid_on_exit(bystander)
        second = reaper_of(registry)
        started.append(second)
        assert second is not first and second.poll() is None
    finally:
        for reaper in started:
            reaper.kill()
            reaper.wait()
            if reaper.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    reaper.stdin.close()
