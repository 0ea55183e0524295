"""The broker: the one thread of a pool that asks the server for slots.

Plain Python. Worker threads never call the API: the broker asks while more sites wait than
slots are parked (and for each group site in line, its pair of its group's slot and a global
one), polls a full server every `poll` seconds, makes room for a pair with a parked slot,
passes a group the server found full over for a moment, and warns while the API fails (after
`api_patience` seconds of failing, every waiting site fails).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from uuid import UUID

from flows.slots.pool_state import Outage, PoolState
from flows.slots.slot_api import PROBE_LEASE, ApiUnavailable, SlotError

_JITTER = random.Random()  # noqa: S311  (poll jitter, not security)
"""The broker's own generator: the global `random` state is left alone, which other code
(and hypothesis, which checks that a test's strategies don't touch it) may rely on."""

logger = logging.getLogger("site_pipeline.slots")


@dataclass(frozen=True)
class _Ask:
    """One acquire the broker makes: a global slot (`site` None, parked when granted) or a
    site's pair of its group's slot and a global slot, for that site."""

    names: tuple[str, ...]
    site: str | None = None
    room: UUID | None = None  # a parked global slot to give back first, to make room


class Broker:
    """Gets from the server the slots that `state`'s waiting sites need."""

    def __init__(self, state: PoolState) -> None:
        self._state = state

    def run(self) -> None:
        """Ask the server for what waits: a global slot whenever more sites outside groups
        wait than slots are parked, and a pair for each group site in line."""
        state = self._state
        while (asks := self._wait_for_asks()) is not None:
            try:
                then = self._ask_all(asks)
            finally:
                with state.cond:
                    state.broker_busy = False
                    state.cond.notify_all()
            if then == "stop":
                return
            if then != "go on":
                with state.cond:  # full: wait for the next poll (a hand-over needs none);
                    # failing: ask less often while it fails
                    pause = state.settings.poll * _JITTER.uniform(0.8, 1.2)
                    state.cond.wait(pause if then == "full" else min(1.0, state.settings.poll * 10))

    def _ask_all(self, asks: list[_Ask]) -> str:
        """One round of `asks`: "stop" (the pool closed or failed for good), "full" (some
        refused), "failing" (the API failed) or "go on"."""
        state = self._state
        outage = state.outage
        began = time.monotonic()
        granted: list[_Ask] = []
        refused: list[_Ask] = []
        for done, ask in enumerate(asks):
            try:
                lease = self._ask(ask)
                if lease is None and outage.since is not None:
                    state.api.renew(PROBE_LEASE, state.settings.lease_seconds)
            except SlotError as exc:
                self._refuse_for_good(ask, exc)
                if ask.site is None:
                    self._asked(asks, done + 1)
                    return "stop"
                continue
            except ApiUnavailable as exc:
                self._asked(asks, done + 1)
                return "stop" if self._gave_up(outage, exc) else "failing"
            outage.since = None
            (granted if lease is not None else refused).append(ask)
            if lease is not None and not self._bring(ask, lease):
                self._asked(asks, done + 1)
                return "stop"
        self._asked(asks, len(asks))
        return "full" if self._note_refusals(refused, granted, began) else "go on"

    def _ask(self, ask: _Ask) -> UUID | None:
        """One acquire; first the room it makes goes back (else it stays parked)."""
        state = self._state
        if ask.room is not None:
            try:
                state.book.give_back(ask.room)
            except ApiUnavailable:
                with state.cond:
                    state.parked.append((ask.room, time.monotonic()))
                raise
        state.book.asking(ask.names)
        lease = None
        try:
            lease = state.api.acquire(ask.names, state.settings.lease_seconds)
        finally:
            if lease is None:
                state.book.refused()
        return lease

    def _wait_for_asks(self) -> list[_Ask] | None:
        """Wait until something is to be asked for and no hold-off is on; the asks (their
        pair sites marked as being asked for); None once the pool is closed."""
        state = self._state
        with state.cond:
            while not state.closed:
                now = time.monotonic()
                hold_off = state.hold_off_until - now
                asks = self._asks(now) if hold_off <= 0 else []
                if asks:
                    state.broker_busy = True
                    return asks
                waits_for_group = any(s in state.groups for s in state.order.waiting_sites)
                if hold_off > 0:
                    state.cond.wait(hold_off)
                else:  # a group site's turn can come with no notify (patience, a refusal)
                    state.cond.wait(0.25 if waits_for_group else None)
            return None

    def _asks(self, now: float) -> list[_Ask]:
        """What to ask for now, in line order (lock held). A parked slot that a group site
        is first in line for leaves the parked ones now, and goes back to the server just
        before its pair is asked for, to make room."""
        state = self._state
        takers, pairs = state.line_plan(now)
        spare = len(state.parked) - len(takers)
        asks = []
        for site in pairs:
            room = None
            if spare > 0:
                spare -= 1
                room = state.parked.pop(0)[0]
                state.prefetch = 0  # sites ask now: demand is what waits
            state.asking.add(site)
            asks.append(_Ask((state.name, state.groups[site]), site, room))
        if state.demand() > len(state.parked):
            asks.append(_Ask((state.name,)))
        return asks

    def _asked(self, asks: list[_Ask], done: int) -> None:
        """The broker is done with `asks`; the room the ones from `done` on would have made
        is parked again."""
        state = self._state
        with state.cond:
            state.asking.difference_update(ask.site for ask in asks if ask.site is not None)
            now = time.monotonic()
            state.parked += [(ask.room, now) for ask in asks[done:] if ask.room is not None]
            state.cond.notify_all()

    def _bring(self, ask: _Ask, lease: UUID) -> bool:
        """Note a granted lease: parked, or held for its site; False once the pool closed."""
        state = self._state
        with state.cond:
            now = time.monotonic()
            state.book.took(lease, now, ask.names)
            if state.closed:
                state.releases.put(lease)
                return False
            if ask.site is None:
                state.parked.append((lease, now))
            elif ask.site in state.order.waiting_sites:
                state.granted[ask.site] = lease
            else:  # it gave up meanwhile
                state.releases.put(lease)
            state.cond.notify_all()
            return True

    def _note_refusals(self, refused: list[_Ask], granted: list[_Ask], began: float) -> bool:
        """Note the server's refusals of one round (begun at `began`); True when it granted
        nothing and nothing changed meanwhile (wait a poll). A refused pair whose global slot
        had room (one was made for it, or a global slot was granted in the same round) means
        its group is full: the group's sites are passed over for `group_recheck` seconds, so
        the sites behind them get the slots. Unless this pool gave one of the group's slots
        back during the round: the refusal may predate that, so the pair is asked again now."""
        state = self._state
        room = any(ask.site is None for ask in granted)
        until = time.monotonic() + state.settings.group_recheck
        again = False
        with state.cond:
            for ask in refused:
                group = ask.names[1] if ask.site is not None else None
                if group is not None and state.released_at.get(group, 0.0) >= began:
                    again = True
                elif group is not None and (ask.room is not None or room):
                    state.passed_over[group] = until
            state.cond.notify_all()
        return not granted and not again

    def _refuse_for_good(self, ask: _Ask, error: SlotError) -> None:
        """A limit is missing: the global one fails every waiting site, a group's only the
        group's sites."""
        state = self._state
        with state.cond:
            state.asking.discard(ask.site or "")
            if ask.site is None:
                state.error = error
            else:
                state.group_errors[ask.names[1]] = error
            state.cond.notify_all()

    def _gave_up(self, outage: Outage, exc: ApiUnavailable) -> bool:
        """Note a failed acquire: warn now and then; after `api_patience` seconds of
        failing, fail every waiting site (True)."""
        state = self._state
        settings = state.settings
        now = time.monotonic()
        outage.since = now if outage.since is None else outage.since
        failing_for = now - outage.since
        if failing_for >= settings.warn_after and now - outage.warned_at >= settings.warn_every:
            outage.warned_at = now
            logger.warning(
                "could not get a concurrency slot of %r from %s: %s; retrying, "
                "waiting sites give up after %gs",
                state.name,
                state.api.url,
                exc.status,
                settings.api_patience,
            )
        if failing_for < settings.api_patience:
            return False
        state.fail(
            SlotError(f"could not get a concurrency slot from {state.api.url}: {exc.status}")
        )
        return True
