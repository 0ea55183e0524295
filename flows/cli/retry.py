"""`--retry-failed`, for `run` and `submit`: find the earlier flow run, decide which of its
sites run again, and say so before anything starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from flows.cli.common import fail
from flows.config import ConfigError

if TYPE_CHECKING:  # flows.ops loads Prefect: only once a command talks to the server
    from flows.ops.resume import EarlierRun, RetryChoice


def earlier_run(ref: str) -> tuple[EarlierRun, RetryChoice]:
    """The flow run `--retry-failed REF` names, and which of its sites to run again. Exits 2
    when REF names no run, or one that may still be running; a run left unfinished by a dead
    process is marked Crashed first (it is over), and the user is told."""
    from flows import ops
    from flows.ops.resume import choose

    try:
        earlier = ops.earlier_run(ref)
        choice = choose(earlier)
    except ConfigError as exc:
        fail(str(exc))
    if not earlier.final:
        ops.mark_crashed(earlier.id, "its process is gone (found by --retry-failed)")
        print(f"flow run {earlier.name} was {earlier.state} with its process gone: now Crashed")
    return earlier, choice


def announce(earlier: EarlierRun, choice: RetryChoice) -> None:
    """Which run is resumed, which of its sites run again (and why), which are skipped."""
    print(f"resuming flow run {earlier.name} ({earlier.id}, {earlier.state}):")
    print(f"  running again {len(choice.rerun)}: " + _named(choice.rerun, choice.why))
    print(f"  skipped {len(choice.skip)} (succeeded): " + _named(tuple(choice.skip), {}))


def _named(sites: Sequence[str], why: dict[str, str], shown: int = 10) -> str:
    """`a.com (exit code 3), b.com, and 4 more`, or `none`."""
    if not sites:
        return "none"
    names = [f"{site} ({why[site]})" if site in why else site for site in sites[:shown]]
    more = f", and {len(sites) - shown} more" if len(sites) > shown else ""
    return ", ".join(names) + more
