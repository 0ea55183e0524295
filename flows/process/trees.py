"""Process trees without POSIX process groups: the backend for Windows, usable anywhere.

- `spawn` starts the pipeline (never through a shell). On Windows it gets a new process
  group (`CREATE_NEW_PROCESS_GROUP`, so a Ctrl-Break reaches it and its children only) and
  joins a Job Object with kill-on-close, so the whole tree dies with our process even if it
  is killed: the Windows counterpart of the reaper. Elsewhere the reaper (`flows.process.groups`)
  is told each pid of the tree.
- `watch` records the pipeline's descendants while it runs (with psutil), so a grandchild
  whose parent already exited is still known, and samples the tree (`TreeUsage`): its RSS
  (every process alive at the sample, summed), the peak of that, and its CPU seconds.
- `stop_tree` asks the whole tree to end (Ctrl-Break on Windows, SIGTERM elsewhere), then
  kills what is left after `grace` seconds. When it can't ask (Ctrl-Break fails wherever our
  process has no console: a Task Scheduler job that runs whether or not the user is logged on,
  a service, a detached process, Wine), it kills at once: it never depends on the polite
  way. The kill is each known process's and, on Windows, the terminate of the pipeline's
  own Job Object (nested in the kill-on-close one), which holds every process of the tree,
  seen by a watch or not. Once its tree has ended, what that job counted
  (the CPU of every process that was ever in it, the largest commit of any one) is the
  attempt's cost (`flows.process.rusage.record`), as `wait4` gives it on POSIX. The Job
  Objects themselves are `flows.process.job_object`'s.

What can still escape: a process started and detached within one watch interval (0.2 s)
before its parent exits, which no watch saw (on Windows the Job Object still holds it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import psutil

from flows.process import groups as procgroup
from flows.process import job_object, procfs, rusage

MB = 1024 * 1024  # a megabyte of RSS, as Scrapy's MEMUSAGE_LIMIT_MB counts it


@dataclass(frozen=True)
class TreeUsage:
    """The tree at one sample of `watch`. `rss_mb`: the RSS of every process of the tree
    alive then, summed, in MB (2**20 bytes); `peak_rss_mb`: the largest `rss_mb` of the
    samples so far; `cpu_s`: user + system CPU seconds of every process of the tree seen so
    far, one that has ended at its last sampled value; `seen_alive`: how many samples found
    some process of the tree alive, holding memory (a peak from fewer than two is a guess)."""

    rss_mb: float
    peak_rss_mb: float
    cpu_s: float
    seen_alive: int = 0


@dataclass
class _Tree:
    proc: subprocess.Popen[bytes]
    owner: str | None
    root: psutil.Process | None
    known: dict[int, psutil.Process] = field(default_factory=dict)
    cpu: dict[int, float] = field(default_factory=dict)  # pid -> CPU seconds, last sampled
    peak_rss: int = 0  # bytes
    seen_alive: int = 0  # samples with some process alive, holding memory
    job: int | None = None  # Windows: the pipeline's own Job Object, for its accounting


_lock = threading.Lock()
_trees: dict[int, _Tree] = {}


if sys.platform == "win32":

    def end_with_us(pid: int) -> None:
        """Kill `pid` when this process dies, however it dies (our Job Object)."""
        job_object.join_our_job(pid)

    def _forget_after_our_death(pids: Iterable[int]) -> None:
        pass  # the Job Object drops processes as they end

    def _ask_to_end(tree: _Tree, procs: Sequence[psutil.Process]) -> None:
        """Raises when Ctrl-Break can't be delivered (no console; `_end` then kills): OSError,
        or SystemError from CPython 3.11's `os.kill`, which then also terminates the leader
        (not its group) and loses track of the OSError."""
        if tree.proc.poll() is None:  # Ctrl-Break to the pipeline's process group
            tree.proc.send_signal(signal.CTRL_BREAK_EVENT)
        else:  # the leader is gone: no group to signal, end each one
            for proc in procs:
                _quietly(proc.terminate)

    _CREATION_FLAGS = subprocess.CREATE_NEW_PROCESS_GROUP

else:

    def end_with_us(pid: int) -> None:
        """Kill `pid` when this process dies, however it dies (the reaper)."""
        procgroup.reap_pid_on_exit(pid)

    def _forget_after_our_death(pids: Iterable[int]) -> None:
        for pid in pids:
            procgroup.forget_pid(pid)

    def _ask_to_end(tree: _Tree, procs: Sequence[psutil.Process]) -> None:
        for proc in procs:
            _quietly(proc.terminate)  # SIGTERM

    _CREATION_FLAGS = 0


def _quietly(action: Callable[[], object]) -> None:
    """Run `action`; a process that is already gone is not an error."""
    try:
        action()
    except psutil.Error:
        pass


def _running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (psutil checks the creation time: no pid-reuse mistakes)."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def spawn(
    argv: Sequence[str],
    cwd: str | os.PathLike[str],
    env: Mapping[str, str],
    owner: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` (never through a shell) and track its tree. Raises OSError."""
    proc = procgroup.popen_pipeline(argv, cwd, env, creationflags=_CREATION_FLAGS)
    track(proc, owner)
    return proc


def track(proc: subprocess.Popen[bytes], owner: str | None = None) -> None:
    """Track the tree of `proc`, just started: it dies with us, and `watch` records its
    descendants. Raises OSError (after killing it) when it can't be tied to us."""
    try:
        end_with_us(proc.pid)
        root: psutil.Process | None = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        root = None  # it already ended
    except OSError:
        proc.kill()  # we could not make sure it dies with us: don't leave it running
        proc.wait()
        raise
    job = job_object.own_job(proc.pid) if root is not None else None
    with _lock:
        _trees[proc.pid] = _Tree(proc, owner, root, job=job)


def watch(proc: subprocess.Popen[bytes]) -> TreeUsage | None:
    """Record the descendants of `proc` (and of those already known) that are alive now, and
    sample the tree: its usage now, or None when no process of it could ever be sampled."""
    with _lock:
        tree = _trees.get(proc.pid)
    if tree is None:
        return None
    for child in _new_descendants(tree):
        tree.known[child.pid] = child
        if sys.platform != "win32":
            procgroup.reap_pid_on_exit(child.pid)
    return _sample(tree)


def _new_descendants(tree: _Tree) -> list[psutil.Process]:
    """The descendants of the tree's root and of its known processes not known yet. On
    Linux from one pass over /proc (`procfs.children_map`) whatever the tree's size;
    elsewhere psutil's `children(recursive=True)` of each."""
    parents = [p for p in [tree.root, *list(tree.known.values())] if p is not None]
    kids = procfs.children_map() if sys.platform.startswith("linux") else None
    if kids is None:
        found: dict[int, psutil.Process] = {}
        for parent in parents:
            try:
                children = parent.children(recursive=True)
            except psutil.Error:
                continue
            found.update((c.pid, c) for c in children if c.pid not in tree.known)
        return list(found.values())
    # Only the live ones are asked: a pid that now belongs to another process is no parent
    # of ours (psutil checks the start time), and a dead one's children went to init.
    queue = [p.pid for p in parents if _running(p)]
    seen = set(queue) | set(tree.known)
    new = []
    while queue:
        for pid in kids.get(queue.pop(), ()):
            if pid not in seen:
                seen.add(pid)
                queue.append(pid)
                try:
                    new.append(psutil.Process(pid))
                except psutil.Error:
                    continue  # gone already; its children were still found
    return new


def known_pids(pid: int) -> frozenset[int]:
    """The descendants `watch` has recorded so far (alive or not) of the tracked tree whose
    root, the pipeline, is `pid`; empty when no such tree is tracked."""
    with _lock:
        tree = _trees.get(pid)
        return frozenset(tree.known) if tree is not None else frozenset()


def usage(proc: subprocess.Popen[bytes]) -> TreeUsage | None:
    """Sample the tree of `proc` as `watch` does, without looking for new descendants (no
    pass over the process table): the last sample of an attempt that has just ended."""
    with _lock:
        tree = _trees.get(proc.pid)
    return None if tree is None else _sample(tree)


def _sample(tree: _Tree) -> TreeUsage | None:
    """Each process of `tree` once (psutil's `oneshot`: a /proc read or two per process):
    the RSS of those alive summed, and their CPU seconds kept for when they are gone."""
    rss = 0
    for proc in [tree.root, *list(tree.known.values())]:
        if proc is None:
            continue
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                resident = proc.memory_info().rss
        except psutil.Error:  # gone (a zombie still answers: RSS 0, its final CPU time)
            continue
        rss += resident
        tree.cpu[proc.pid] = times.user + times.system
    if not tree.cpu:
        return None
    tree.peak_rss = max(tree.peak_rss, rss)
    tree.seen_alive += rss > 0
    cpu = sum(list(tree.cpu.values()))
    return TreeUsage(rss / MB, tree.peak_rss / MB, cpu, tree.seen_alive)


def _end(tree: _Tree, grace: float) -> list[int]:
    """SIGTERM (Ctrl-Break) to every live process of `tree`, SIGKILL after `grace` s; the
    kill at once when it can't be asked (`_ask_to_end` raised: on Windows, no console to
    send Ctrl-Break from)."""
    procs = [p for p in [tree.root, *tree.known.values()] if p is not None and _running(p)]
    if procs:
        try:
            _ask_to_end(tree, procs)
        except Exception:  # for any reason: CPython 3.11's os.kill raises SystemError (from
            # the OSError) when Ctrl-Break can't be sent, as under Wine or with no console
            polite_until = time.monotonic()  # no way to ask: no grace to wait out
        else:
            polite_until = time.monotonic() + grace
        while any(_running(p) for p in procs) and time.monotonic() < polite_until:
            time.sleep(0.02)
    if tree.job is not None:  # what is left of the tree, seen by a watch or not
        job_object.terminate_job(tree.job)
    if procs:
        for proc in procs:
            if _running(proc):
                _quietly(proc.kill)
        deadline = time.monotonic() + 5
        while any(_running(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
    rusage.reap(tree.proc)
    counted = job_object.close_job(tree.job) if tree.job is not None else None
    if counted is not None:
        rusage.record(tree.proc, counted)
    pids = [tree.proc.pid, *tree.known]
    _forget_after_our_death(pids)
    return pids


def stop_tree(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Stop `proc` and every descendant seen: politely, then by force after `grace` s."""
    watch(proc)
    with _lock:
        tree = _trees.pop(proc.pid, None)
    if tree is None:
        rusage.reap(proc)
        return
    _end(tree, grace)


def stop_all(grace: float, owner: str | None = None) -> list[int]:
    """Stop every tree this process started for `owner` (None: all). Returns their root pids."""
    with _lock:
        trees = [t for t in _trees.values() if owner is None or t.owner == owner]
    for tree in trees:
        watch(tree.proc)
    with _lock:
        for tree in trees:
            _trees.pop(tree.proc.pid, None)
    threads = [threading.Thread(target=_end, args=(tree, grace)) for tree in trees]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [tree.proc.pid for tree in trees]
