"""Which sites `--retry-failed` runs again, and how the skipped ones are reported.

Plain Python: `flows.admin.earlier_run` reads the earlier flow run from the API, then
`choose` decides. A site is skipped only when it succeeded (in that run, or in the run
*that* one resumed); everything else runs again: failed, timed out, cancelled, never
started, or left Running by a process that is gone.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flows.config import ConfigError
from flows.report import SiteReport

HOLDER_LABELS = ("site-pipeline.host", "site-pipeline.pid", "site-pipeline.pid_started")
"""Flow run labels naming the process that runs it, so that a run left Running by a process
that is gone can be told from one still running (`doctor`, `--retry-failed`)."""


UNFINISHED = frozenset({"Running", "Pending", "Scheduled", "AwaitingRetry", "Retrying"})
"""Task run states that only a run that died leaves behind (the run was not still running:
`choose` refuses that)."""


@dataclass(frozen=True)
class EarlierRun:
    """What the API knows of the run being resumed."""

    id: str
    name: str
    state: str  # the state's name: "Failed", "Running", "Crashed", ...
    final: bool
    parameters: Mapping[str, object]
    sites: tuple[str, ...]  # the run's site list, in order
    outcomes: Mapping[str, str]  # site -> its task run's state name ("Completed", ...)
    holder_alive: bool | None  # its process: alive, gone, or can't tell (None)
    deployment: str | None = None  # "flow/name" when a deployment made it


@dataclass(frozen=True)
class RetryChoice:
    rerun: tuple[str, ...]
    skip: dict[str, str]  # site -> note for the summary's `error` column
    why: dict[str, str]  # rerun site -> its earlier outcome


def choose(earlier: EarlierRun) -> RetryChoice:
    """Split the earlier run's sites into those to run again and those to skip.

    Raises `ConfigError` when the earlier run may still be running: resuming it would run
    its sites twice at once.
    """
    if not earlier.final and earlier.holder_alive is not False:
        how = (
            "its process is still alive"
            if earlier.holder_alive
            else "this host can't tell whether its process is gone"
        )
        raise ConfigError(
            [
                f"--retry-failed {earlier.id}: flow run {earlier.name!r} is {earlier.state} and "
                f"{how}; wait for it, cancel it, or run `site-pipeline doctor --fix` once its "
                "process is gone"
            ]
        )
    carried = earlier.parameters.get("skip") or {}
    if not isinstance(carried, Mapping):
        carried = {}
    skip: dict[str, str] = {}
    why: dict[str, str] = {}
    for site in earlier.sites:
        outcome = earlier.outcomes.get(site)
        if site in carried:
            skip[site] = str(carried[site])
        elif outcome == "Completed":
            skip[site] = f"succeeded in flow run {earlier.name} ({earlier.id})"
        elif outcome is None:
            why[site] = "never started"
        elif outcome in UNFINISHED:
            why[site] = f"left {outcome} by a process that is gone"
        else:
            why[site] = outcome.lower()
    rerun = tuple(site for site in earlier.sites if site not in skip)
    return RetryChoice(rerun, skip, why)


def skipped_reports(sites: Sequence[str], skip: Mapping[str, str]) -> dict[str, SiteReport]:
    """The summary's `skipped` rows for the flow's `skip` parameter. Raises `ConfigError`
    for a site that is not in `sites`."""
    unknown = [site for site in skip if site not in sites]
    if unknown:
        raise ConfigError(
            [f"skip = {json.dumps(unknown[:5])}: expected sites of the run's site list"]
        )
    return {
        site: SiteReport(site, "skipped", 0, None, 0.0, str(note)) for site, note in skip.items()
    }


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
