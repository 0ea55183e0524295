"""Which sites `--retry-failed` runs again, and how the skipped ones are reported.

Plain Python: `flows.ops.admin.earlier_run` reads the earlier flow run from the API, then
`choose` decides. A site is skipped only when it succeeded (in that run, or in the run
*that* one resumed); everything else runs again: failed, timed out, cancelled, never
started, or left Running by a process that is gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flows.config import ConfigError

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
