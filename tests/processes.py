"""Helpers for tests that check which processes are still alive."""

from __future__ import annotations

import time
from pathlib import Path

import psutil


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
