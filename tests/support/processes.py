"""Processes in tests: starting them tied to the test session, and checking which are alive.

Every process a test starts goes through `start_tied` or `run_tied`: it leads its own
process group, which the product's reaper (`flows.process.groups`) ends if this pytest
process dies first, however it dies (a SIGKILL'd pytest or pytest-xdist worker too), so
nothing a test started outlives the suite. A group that ended is forgotten (its number may
be reused).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from flows.process import groups as procgroup
from flows.process.holders import holder_labels


def start_tied(argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
    """`subprocess.Popen(argv, **popen)` as the leader of a new process group, tied to this
    process: it ends with a killed pytest. Stop it with `stop_tied` (or let it end and call
    `untie`)."""
    proc: subprocess.Popen[Any] = subprocess.Popen(list(argv), start_new_session=True, **popen)
    procgroup.reap_group_on_exit(proc.pid)
    return proc


def untie(proc: subprocess.Popen[Any]) -> None:
    """`proc` has ended (or was stopped): the reaper forgets its group."""
    procgroup.forget_group(proc.pid)


def stop_tied(proc: subprocess.Popen[Any], grace: float = 10) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL after `grace` seconds; the
    reaper forgets it."""
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue
    finally:
        untie(proc)


def run_tied(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 300,
    stdin: int | None = subprocess.DEVNULL,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(argv, capture_output=True, text=True)` with a tied process group: on
    `timeout` the whole group is killed before `TimeoutExpired` propagates. `input` is
    written to its stdin (then a pipe)."""
    if input is not None:
        stdin = subprocess.PIPE
    proc = start_tied(
        argv,
        env=None if env is None else dict(env),
        cwd=cwd,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except BaseException:
        stop_tied(proc, grace=2)
        proc.communicate()
        raise
    untie(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


READY = "print('ready', flush=True)\n"
"""A line of Python that says the script is ready (`spawned_in_group` waits for it)."""


@contextlib.contextmanager
def spawned_in_group(
    script: str, folder: Path, owner: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -c script` started by `flows.process.groups.spawn` (its own process group),
    waited for until it prints `ready` (if the script holds `READY`); its group stopped, the
    leader reaped and its pipes closed at the end."""
    proc = procgroup.spawn([sys.executable, "-c", script], cwd=folder, env=os.environ, owner=owner)
    try:
        if READY in script:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        procgroup.stop_group(proc, 0.5)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie (this machine's init may never reap zombies)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def hanging_pids(folder: Path, count: int = 1, timeout: float = 120) -> list[int]:
    """The pids that `count` hanging fake pipelines wrote to `folder` (pipeline, grandchild)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [f for f in folder.glob("*.pids") if f.read_text().endswith("\n")]
        if len(files) >= count:
            return [int(pid) for f in files for pid in f.read_text().split()]
        time.sleep(0.05)
    raise AssertionError(f"{len(list(folder.glob('*.pids')))} of {count} pipelines started")


def wait_until_gone(pids: list[int], timeout: float = 30) -> list[int]:
    """Wait until none of `pids` is alive; return those still alive at the timeout."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


def keepers_under(folder: Path) -> list[psutil.Process]:
    """The kept local servers' keepers (`flows.ops.keeper`) whose PREFECT_HOME is in
    `folder`: a run leaves one behind on purpose, detached from the test session."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if "flows.ops.keeper" not in argv or "--home" not in argv[:-1]:
            continue
        home = Path(argv[argv.index("--home") + 1])
        if home == folder or folder in home.parents:
            found.append(proc)
    return found


def tie_keepers(folder: Path) -> list[int]:
    """Tie the keepers under `folder` to this session (the reaper kills them, and so their
    servers, if this process dies first): a killed pytest leaves no kept server either."""
    pids = [keeper.pid for keeper in keepers_under(folder)]
    for pid in pids:
        procgroup.reap_pid_on_exit(pid)
    return pids


def stop_keepers(folder: Path, timeout: float = 30) -> list[int]:
    """SIGTERM every keeper under `folder` (it stops its server first) and wait until they
    and their servers are gone; the pids that were stopped."""
    keepers = keepers_under(folder)
    tree = []
    for keeper in keepers:
        try:
            tree += [keeper, *keeper.children(recursive=True)]
            keeper.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return [keeper.pid for keeper in keepers]


def dead_labels() -> dict[str, str]:
    """Holder labels of a process that has ended (a dead run's, for slot ledgers)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(child.pid).create_time()
    child.wait()
    return holder_labels(child.pid, started)
