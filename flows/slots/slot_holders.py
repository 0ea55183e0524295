"""Who holds the slots of a limit: the pools with a ledger on this host (their run, pid and
whether it is alive), and what no ledger here explains; for `doctor` and a long wait's line."""

from __future__ import annotations

from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient

from flows.process.holders import HOST_LABEL, PID_LABEL
from flows.slots import ledger, ledger_home


def holders(client: SyncPrefectClient, name: str, this_run: UUID | None = None) -> list[str]:
    """Who holds the slots of the limit `name`, one entry per holder: `1 by run NAME (pid P,
    alive)` for a pool with a ledger here (its process alive, dead, or on another host),
    then what no ledger here explains: `by no live process` on the embedded default, else
    `by no run of this host` (another host's, or a crash's)."""
    in_use = int(client.read_global_concurrency_limit_by_name(name).active_slots)
    entries, counted = [], 0
    for found, alive in ledger.ledgers(ledger_home.ledger_folder(), ledger_home.ledger_api()):
        mine = this_run is not None and found.holder == str(this_run)
        if mine:
            found.asking = ()  # this run's own ask in flight is its wait, not a slot it holds
        held = found.slots()[name]
        if not held:
            continue
        counted += held
        pid = found.labels.get(PID_LABEL, "?")
        if alive is None:
            state = f"on {found.labels.get(HOST_LABEL, 'an unknown host')}, not checked from here"
        else:
            state = "alive" if alive else "dead"
        run = "this run" if mine else f"run {_run_name(client, found.holder)}"
        entries.append(f"{held} by {run} (pid {pid}, {state})")
    rest = in_use - counted
    if rest > 0:
        who = "no live process" if ledger_home.on_embedded_default() else "no run of this host"
        entries.append(f"{rest} by {who}")
    return entries


def holders_line(client: SyncPrefectClient, name: str, this_run: UUID | None = None) -> str:
    """`2 of 2 slots of 'site-pipeline' held by run NAME (pid P, alive)`; a holder that is
    gone adds `: run `site-pipeline doctor --fix``."""
    limit = client.read_global_concurrency_limit_by_name(name)
    entries = holders(client, name, this_run)
    if len(entries) == 1:
        held = entries[0].split(" ", 1)[1]  # one holder has them all
        line = f"{int(limit.active_slots)} of {limit.limit} slots of {name!r} held {held}"
    else:
        line = f"{int(limit.active_slots)} of {limit.limit} slots of {name!r} held: " + (
            ", ".join(entries) or "none"
        )
    if any(entry.endswith((", dead)", "no live process")) for entry in entries):
        line += ": run `site-pipeline doctor --fix`"
    return line


def _run_name(client: SyncPrefectClient, holder: str) -> str:
    """The flow run's name, else its id."""
    try:
        return str(client.read_flow_run(UUID(holder)).name)
    except Exception:  # not a flow run this server knows, or no answer: the id says enough
        return holder
