"""Reclaiming slots no live process holds: a dead pool's leases, and on the embedded default
the slots in use beyond what live pools here hold (`reclaim`, run by `doctor --fix` and at a
run's start)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from prefect.client.orchestration import SyncPrefectClient
from prefect.exceptions import ObjectNotFound

from flows.process.holders import PID_LABEL
from flows.slots import ledger, ledger_home
from flows.slots.prefect_api import CANARY_SECONDS, Canary, PrefectSlotApi


def reclaim(
    client: SyncPrefectClient, dry_run: bool = False, names: Sequence[str] = ()
) -> list[str]:
    """Give back the slots that no live process holds; one line per dead pool, and per limit
    of `names` (or held in a ledger) with slots nobody holds, saying what was (or, with
    `dry_run`, would be) given back.

    1. A dead pool's lease the server still knows is released. One it no longer knows either
       expired (the server's lease expiry gave its slot back) or was lost when the server
       restarted with its leases in memory (its slot still counts): the pool's canary lease
       tells which (`_lost_in_restart`). A lost one's slot is given back by name.
    2. On the embedded default every holder is a process of this host with a ledger here, so
       each limit's slots in use beyond what live pools hold or are asking for are held by
       nobody (a ledger of an older version, an ask a crash cut short): given back by name.
       On another server a slot no ledger here explains may be another host's: left alone.
    """
    api, folder = ledger_home.ledger_api(), ledger_home.ledger_folder()
    slots = PrefectSlotApi(client)
    lines = []
    for orphan in ledger.orphans(folder, api):
        lines += _reclaim(slots, orphan, dry_run)
    if ledger_home.on_embedded_default() and ledger_home.serves_this_home(client):
        lines += _reclaim_unheld(client, slots, [*names], dry_run)
    return lines


def _reclaim(slots: PrefectSlotApi, orphan: ledger.Orphan, dry_run: bool) -> list[str]:
    """Give back what one dead pool held (see `reclaim`); its line, if it held anything."""
    given = 0
    lost: bool | None = None
    for lease, names in orphan.leases.items():
        if dry_run:
            given += 1
        elif slots.renew(lease, 60.0):
            slots.release(lease)
            given += 1
        else:
            if lost is None:
                lost = _lost_in_restart(slots, orphan)
            if lost:
                slots.release_unleased(names, held_seconds=0.001)
                given += 1
    if not dry_run:
        if orphan.canary is not None and slots.renew(orphan.canary, 60.0):
            slots.release(orphan.canary)
        orphan.path.unlink(missing_ok=True)
    if not orphan.leases:  # it held nothing when it died
        return []
    verb = "would give back" if dry_run else "gave back"
    line = (
        f"{verb} {given} of {len(orphan.leases)} slot(s) held by flow run {orphan.holder}, "
        f"whose process ({orphan.labels.get(PID_LABEL, '?')}) is gone"
    )
    if given < len(orphan.leases):
        line += (
            "; the server's lease expiry gave the rest back"
            if lost is False
            else "; the rest: the server no longer knows their leases (expired, or lost in a "
            "restart: its canary can't tell)"
        )
    return [line]


def _lost_in_restart(slots: PrefectSlotApi, orphan: ledger.Orphan) -> bool | None:
    """Whether the server lost the dead pool's leases in a restart (their slots still count)
    rather than let them expire (their slots went back): the pool's canary, a lease on no
    limit that lasts `CANARY_SECONDS` and that the pool renewed while it ran, is gone too
    only after a restart, if the pool was seen within that time. None: can't tell (no
    canary, or seen too long ago)."""
    if orphan.canary is None:
        return None
    if slots.renew(orphan.canary, 60.0):
        return False
    if time.time() - orphan.seen < CANARY_SECONDS - Canary.EVERY:
        return True
    return None


def _reclaim_unheld(
    client: SyncPrefectClient, slots: PrefectSlotApi, names: list[str], dry_run: bool
) -> list[str]:
    """On the embedded default: each limit's slots in use that no live pool here holds or
    asks for, given back by name (see `reclaim`). Counted twice, a moment apart, and the
    smaller surplus taken: a slot taken and given back between the two reads of one count
    (a pipeline of a few milliseconds) is not mistaken for an orphan."""
    api, folder = ledger_home.ledger_api(), ledger_home.ledger_folder()
    lines = []
    for name in sorted({*names, *ledger.holdings(folder, api)}):
        surplus = None
        for look in range(2):
            if look:
                time.sleep(0.2)
            try:
                in_use = client.read_global_concurrency_limit_by_name(name).active_slots
            except ObjectNotFound:
                break
            held = ledger.holdings(folder, api)[name]
            surplus = min(surplus if surplus is not None else in_use, in_use - held)
            if surplus <= 0:
                break
        if not surplus or surplus <= 0:
            continue
        if not dry_run:
            for _ in range(surplus):
                slots.release_unleased([name], held_seconds=0.001)
        verb = "would give back" if dry_run else "gave back"
        lines.append(
            f"{verb} {surplus} slot(s) of {name!r} that no live process holds "
            f"(the server counted {in_use} in use, live runs here hold {held})"
        )
    return lines
