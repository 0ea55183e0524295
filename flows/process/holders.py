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


def holder_alive(labels: Mapping[str, object]) -> bool | None:
    """Whether the process the labels name still runs: None when they are missing or name
    another host (it can't be checked from here)."""
    import psutil

    host, pid_label, started_label = HOLDER_LABELS
    if labels.get(host) != socket.gethostname() or pid_label not in labels:
        return None
    try:
        proc = psutil.Process(int(str(labels[pid_label])))
        return f"{proc.create_time():.2f}" == str(labels.get(started_label)) and (
            proc.status() != psutil.STATUS_ZOMBIE
        )
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:  # pragma: no cover - another user's process: it runs
        return True


def this_process_labels() -> dict[str, str]:
    import psutil

    return holder_labels(os.getpid(), psutil.Process().create_time())
