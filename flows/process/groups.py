"""POSIX process groups: start a pipeline in its own group, and stop the whole group.

This is the only module that knows about signals and process groups. Its
interface is small:

- `ensure_supported()` raises `UnsupportedPlatform` where process groups don't exist.
- `spawn(argv, cwd, env)` starts a process as the leader of a new session/group.
- `stop_group(proc, grace)` sends SIGTERM to the group, then SIGKILL after `grace`.
- `stop_all(grace, owner)` stops every group this process started for `owner` (a flow run;
  None = every group) that is still alive.
- `group_alive(pgid)` tells whether any process of a group is still there.

Every group is also registered with a small reaper process (`_reaper.py`), which
lives in a session of its own and kills the groups that are still registered
when this process dies, even by SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.process import procfs, rusage

_REAPER_SCRIPT = Path(__file__).with_name("_reaper.py")


class UnsupportedPlatform(RuntimeError):
    """Raised where POSIX process groups are not available (e.g. native Windows)."""


_NO_GROUPS = f"{sys.platform!r} has no POSIX process groups; use process_control: tree (or auto)"


def supported() -> bool:
    """True where POSIX process groups exist (not on native Windows)."""
    return os.name == "posix" and hasattr(os, "killpg")


def ensure_supported() -> None:
    """Raise `UnsupportedPlatform` unless this platform has POSIX process groups."""
    if not supported():
        raise UnsupportedPlatform(
            f"site-pipeline runs each pipeline in its own POSIX process group, which "
            f"{sys.platform!r} does not have; run it on Linux or macOS (or WSL on Windows)"
        )


class _Registry:
    """Live process groups of this process, mirrored to the reaper."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[int, str | None] = {}  # pgid -> owner
        # The reaper and the pid of the process that started it: a fork (e.g. a worker
        # process) starts its own.
        self._reaper: tuple[subprocess.Popen[bytes], int] | None = None

    def _tell_reaper(self, line: str) -> None:
        # Called with the lock held.
        if (
            self._reaper is None
            or self._reaper[1] != os.getpid()
            or self._reaper[0].poll() is not None
        ):
            started = subprocess.Popen(
                [sys.executable, "-I", str(_REAPER_SCRIPT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
            self._reaper = (started, os.getpid())
        reaper = self._reaper[0]
        assert reaper.stdin is not None  # noqa: S101  (stdin=PIPE above)
        try:
            reaper.stdin.write(line.encode() + b"\n")
            reaper.stdin.flush()
        except BrokenPipeError:  # the reaper stopped reading; the next call starts one
            self._reaper = None

    def add(self, pgid: int, owner: str | None) -> None:
        with self._lock:
            self._groups[pgid] = owner
            self._tell_reaper(f"+{pgid}:{procfs.start_time(pgid)}")

    def discard(self, pgid: int) -> None:
        with self._lock:
            if pgid in self._groups:
                del self._groups[pgid]
                self._tell_reaper(f"-{pgid}")

    def tell_reaper(self, line: str) -> None:
        with self._lock:
            self._tell_reaper(line)

    def snapshot(self, owner: str | None = None) -> list[int]:
        with self._lock:
            return sorted(p for p, o in self._groups.items() if owner is None or o == owner)


_registry = _Registry()


def reap_pid_on_exit(pid: int) -> None:
    """Have the reaper kill the single process `pid` if this process dies first (a tracked
    tree's member, `flows.process.trees`)."""
    _registry.tell_reaper(f"+p{pid}:{procfs.start_time(pid)}")


def reap_group_on_exit(pgid: int) -> None:
    """Have the reaper end the process group `pgid` if this process dies first, without
    counting it among our pipelines (`stop_all` leaves it alone): a server we started."""
    _registry.tell_reaper(f"+{pgid}:{procfs.start_time(pgid)}")


def forget_group(pgid: int) -> None:
    """The group `pgid` (given to `reap_group_on_exit`) was stopped: the reaper forgets it."""
    _registry.tell_reaper(f"-{pgid}")


def forget_pid(pid: int) -> None:
    """`pid` ended: the reaper must not kill it (its number may be reused)."""
    _registry.tell_reaper(f"-p{pid}")


def spawn(
    argv: Sequence[str],
    cwd: str | os.PathLike[str],
    env: Mapping[str, str],
    owner: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` (never through a shell) as the leader of a new process group, on
    behalf of `owner` (see `stop_all`).

    stdin is /dev/null; stdout and stderr are pipes. Raises OSError when the
    program cannot be started.
    """
    ensure_supported()
    proc = popen_pipeline(argv, cwd, env, start_new_session=True)
    _registry.add(proc.pid, owner)
    return proc


def popen_pipeline(
    argv: Sequence[str], cwd: str | os.PathLike[str], env: Mapping[str, str], **how: Any
) -> subprocess.Popen[bytes]:
    """Start `argv` as every backend starts a pipeline: never through a shell, stdin
    /dev/null, stdout and stderr pipes, no other descriptor inherited. `how` adds the
    backend's own (a new session; a new Windows process group). Raises OSError."""
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        **how,
    )


_ENDED = (b"Z", b"X")  # /proc states of a process that has ended: zombie, dead


def _linux_group_has_live_member(pgid: int) -> bool:
    # /proc lets us skip zombies: an init that never reaps would otherwise keep
    # a dead group looking alive forever.
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = procfs.stat_fields(entry.name)
        if (
            fields is not None
            and len(fields) > procfs.PGRP
            and int(fields[procfs.PGRP]) == pgid
            and fields[procfs.STATE] not in _ENDED
        ):
            return True
    return False


def group_alive(pgid: int) -> bool:
    """True while any process of group `pgid` is alive (zombies don't count on Linux)."""
    if sys.platform == "win32":  # for mypy --platform win32: POSIX only
        raise UnsupportedPlatform(_NO_GROUPS)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if sys.platform.startswith("linux"):
        return _linux_group_has_live_member(pgid)
    return True  # elsewhere an unreaped zombie leader counts: stop_group then waits `grace`


def _signal_group(pgid: int, sig: int) -> None:
    if sys.platform == "win32":  # for mypy --platform win32: POSIX only
        raise UnsupportedPlatform(_NO_GROUPS)
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def exited(proc: subprocess.Popen[bytes]) -> bool:
    """True once the group's leader has exited. It is not reaped here: as a zombie it
    keeps its pid, and so the group id, from being reused by a new process, which
    `stop_group` would otherwise signal by mistake."""
    if sys.platform == "win32":  # for mypy --platform win32: POSIX only
        raise UnsupportedPlatform(_NO_GROUPS)
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (AttributeError, ChildProcessError):  # no waitid here (macOS): reap instead
        return rusage.poll(proc) is not None
    return info is not None


def _wait_group_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while group_alive(pgid):
        if time.monotonic() >= deadline:  # pragma: no mutate - `>` differs only at a float tie
            return False
        time.sleep(0.02)
    return True  # pragma: no mutate - False only adds a SIGKILL to a group with no live member


def stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Stop every process in `proc`'s group: SIGTERM, then SIGKILL after `grace` seconds.

    Also called after a normal exit, so that background grandchildren left by the
    pipeline do not outlive its attempt. The leader is reaped only at the end, so
    the group id stays ours while we signal it.
    """
    if sys.platform == "win32":  # for mypy --platform win32: POSIX only
        raise UnsupportedPlatform(_NO_GROUPS)
    pgid = proc.pid
    try:
        if proc.returncode is None and group_alive(pgid):
            _signal_group(pgid, signal.SIGTERM)
            if not _wait_group_gone(pgid, grace):
                _signal_group(pgid, signal.SIGKILL)
                # Members vanish once their parents reap them; wait briefly.
                _wait_group_gone(pgid, 5)
    finally:
        rusage.reap(proc)  # with the kernel's account of it (flows.process.rusage)
        _registry.discard(pgid)


def stop_all(grace: float, owner: str | None = None) -> list[int]:
    """Stop every group this process started for `owner` (None: for anyone) that is still
    registered. Returns their ids."""
    if sys.platform == "win32":  # for mypy --platform win32: POSIX only
        raise UnsupportedPlatform(_NO_GROUPS)
    groups = _registry.snapshot(owner)
    for pgid in groups:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(group_alive(p) for p in groups):
        time.sleep(0.05)
    for pgid in groups:
        _signal_group(pgid, signal.SIGKILL)
        _registry.discard(pgid)
    return groups
