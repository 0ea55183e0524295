"""Which process runs a flow run, and whether it is still alive (plain Python).

The flow labels its flow run with its host, pid and the pid's start time
(`HOLDER_LABELS`); the same labels head each slot pool's lease ledger
(`flows.slots.ledger`). `holder_alive` tells a run left Running by a process that is
gone from one still running (`doctor`, `--retry-failed`, the ledger's orphans).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

HOST_LABEL = "site-pipeline.host"
PID_LABEL = "site-pipeline.pid"
STARTED_LABEL = "site-pipeline.pid_started"
HOLDER_LABELS = (HOST_LABEL, PID_LABEL, STARTED_LABEL)
"""Flow run labels naming the process that runs it, so that a run left Running by a process
that is gone can be told from one still running (`doctor`, `--retry-failed`)."""


def holder_labels(pid: int, started: float) -> dict[str, str]:
    """This process's labels for its flow run (see `HOLDER_LABELS`)."""
    host, pid_label, started_label = HOLDER_LABELS
    return {host: socket.gethostname(), pid_label: str(pid), started_label: f"{started:.2f}"}


START_TOLERANCE = 0.5
"""Seconds a recorded start time may differ from the process's own and still name it: the
one rule for "is this pid still that process, not a reused pid?" (labels keep 2 decimals;
a new process on a reused pid starts much later)."""


def process_started(pid: int) -> float | None:
    """`pid`'s start time, or None when no such process runs (a zombie counts as gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def same_process(pid: int, started: float) -> bool:
    """`pid` runs and is the process that started at `started` (within `START_TOLERANCE`),
    not a process that reused its number. A process whose start time can't be read (another
    user's) counts as that one: a live process is never taken for a dead one."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - started) < START_TOLERANCE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # pragma: no cover - another user's process: it runs
        return True


def holder_alive(labels: Mapping[str, object]) -> bool | None:
    """Whether the process the labels name still runs (`same_process`): None when they are
    missing or name another host (it can't be checked from here)."""
    host, pid_label, started_label = HOLDER_LABELS
    if labels.get(host) != socket.gethostname() or pid_label not in labels:
        return None
    try:
        return same_process(int(str(labels[pid_label])), float(str(labels.get(started_label))))
    except ValueError:
        return False


def this_process_labels() -> dict[str, str]:
    import psutil

    return holder_labels(os.getpid(), psutil.Process().create_time())
