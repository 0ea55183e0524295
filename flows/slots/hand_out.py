"""The hand-out: a site's thread takes a slot from what its pool holds, and gives it back.

Plain Python. A site waits in `HandOut.acquire` until a slot is there for it (a parked
global slot, when the order says it is its turn, or the pair of its group's slot and a
global one that the broker got for it); no API call is made here while it waits. A slot
given back goes straight to a waiting site, stays parked a moment, or goes back to the server
(`SlotPool`'s module docstring says when).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from uuid import UUID

from flows.slots.pool_state import PoolState
from flows.slots.slot_api import SlotError


class WaitStopped(Exception):
    """The run stops (or halted): a site waiting for a slot gives up its wait (`stop_waits`)."""


class HandOut:
    """Slots from `state` to the sites' threads, and back."""

    def __init__(self, state: PoolState) -> None:
        self._state = state

    def acquire(self, site: str, on_long_wait: Callable[[str], None] | None = None) -> UUID:
        """Wait until a slot is there for `site`, and take it: its lease (`SlotPool.slot`).
        Raises `SlotError`, or `WaitStopped` once the pool's waits are stopped."""
        state = self._state
        patience = state.settings.patience
        group = state.groups.get(site)
        with state.cond:
            state.order.wait(site, time.monotonic())
            state.waiting_since[site] = time.monotonic()
            state.cond.notify_all()  # wake the broker
            try:
                while True:
                    if state.waits_stopped is not None:
                        raise WaitStopped(state.waits_stopped)
                    notice = state.notices.pop(site, None)
                    if notice is not None and on_long_wait is not None:
                        state.cond.release()  # the line may be slow to write: not under the lock
                        try:
                            on_long_wait(notice)
                        finally:
                            state.cond.acquire()
                        continue
                    if state.error is not None:
                        raise state.error
                    if group is not None and group in state.group_errors:
                        raise state.group_errors[group]
                    if state.closed:
                        raise SlotError(f"slot pool for {state.name!r} is closed")
                    lease = self._take(site, group)
                    if lease is not None:
                        break
                    # Timed wait: `patience` can make this site eligible with no notify.
                    # (With no patience every waiter is eligible: a hand-over notifies.)
                    state.cond.wait(patience / 4 if patience > 0 else 1.0)
                state.in_use[lease] = group
                state.order.started(site)
                state.cond.notify_all()
                return lease
            finally:
                state.order.stop_waiting(site)
                state.waiting_since.pop(site, None)
                state.noticed.discard(site)
                state.notices.pop(site, None)
                unused = state.granted.pop(site, None)  # granted as it gave up
                if unused is not None:
                    state.releases.put(unused)

    def _take(self, site: str, group: str | None) -> UUID | None:
        """`site`'s lease, if one is there for it now (lock held): its granted pair, or for
        a site outside groups a parked slot, when it is among the first in line."""
        state = self._state
        if group is not None:
            return state.granted.pop(site, None)
        if not state.parked or site not in state.line_plan(time.monotonic())[0]:
            return None
        lease, _ = state.parked.pop()
        state.prefetch = 0  # sites ask now: demand is what waits
        return lease

    def give_back(self, lease: UUID) -> None:
        """`lease`'s pipeline ended: park it, hand it to a waiting site, or give it back."""
        state = self._state
        with state.cond:
            group = state.in_use.pop(lease, None)
            acquired_at = state.book.acquired_at(lease)
            fresh = (
                acquired_at is not None
                and time.monotonic() - acquired_at < state.settings.fair_share
            )
            # Keep it (briefly) only while a thread waits or a site of this run may ask,
            # and only for `fair_share` seconds in all: then other flow runs get a turn.
            # A pair is never kept: it goes back, and the broker asks for what is next.
            wanted = state.order.waiting > len(state.parked) or (
                state.park and state.order.unfinished > len(state.in_use)
            )
            if group is None and not state.closed and fresh and wanted:
                state.parked.append((lease, time.monotonic()))
                state.cond.notify_all()
                return
            heir = state.heir(group) if group is not None and fresh else None
            if heir is not None:  # the pair goes straight to the group's next site
                state.granted[heir] = lease
                state.cond.notify_all()
                return
            if not fresh:  # its turn is over: don't race other flow runs for this slot
                state.hold_off_until = time.monotonic() + 4 * state.settings.poll
            state.cond.notify_all()  # a group below its cap again
        if group is not None:
            # A pair goes back now, before its group's next site asks: released later, the
            # server would still count it, refuse that pair, and pass the group over.
            state.release_now(lease)
            with state.cond:
                state.passed_over.pop(group, None)
                state.released_at[group] = time.monotonic()
                state.cond.notify_all()
        elif state.park:
            state.releases.put(lease)
        else:
            state.release_now(lease)
        if not state.park:
            self._give_back_surplus()

    def _give_back_surplus(self) -> None:
        """A pool that doesn't park: the parked slots no waiting site needs go back now,
        before `slot()` returns; the last block of the pool first waits for the broker's
        asks to come in (a slot in use still gives back after, and settles what comes)."""
        state = self._state
        with state.cond:
            state.cond.wait_for(
                lambda: not state.broker_busy or state.closed or bool(state.in_use),
                timeout=min(state.settings.api_patience, 30.0),
            )
            surplus = max(0, len(state.parked) - state.demand())
            spare = [lease for lease, _ in state.parked[len(state.parked) - surplus :]]
            del state.parked[len(state.parked) - surplus :]
        for lease in spare:
            state.release_now(lease)
