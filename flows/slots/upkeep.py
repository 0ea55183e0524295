"""The pool's upkeep: its upkeep thread and its releaser thread.

Plain Python. The upkeep thread gives back slots parked longer than `linger` seconds, renews the
held leases every third of a lease's duration (through the lease book), and has a line
written for a site that waits long, saying who holds the cap. The releaser gives queued
leases back, so a site's thread never waits on the API.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from flows.slots.pool_state import PoolState


class Upkeep:
    """The upkeep and the releaser threads of `state`'s pool (`tend` and `release`, each a thread).

    `on_tick` is called on every round of the upkeep thread; `explain_wait` says who holds the cap,
    for a site that waits longer than `settings.wait_notice`."""

    def __init__(
        self,
        state: PoolState,
        on_tick: Callable[[], None] | None,
        explain_wait: Callable[[], str] | None,
    ) -> None:
        self._state = state
        self._on_tick = on_tick
        self._explain_wait = explain_wait
        self.stopped = threading.Event()  # `tend` returns once it is set

    def tend(self) -> None:
        """Return slots parked longer than `linger` seconds, and renew held leases."""
        state = self._state
        linger, lease_seconds = state.settings.linger, state.settings.lease_seconds
        next_renewal = time.monotonic() + lease_seconds / 3
        while not self.stopped.wait(min(linger / 2, 0.25)):
            if self._on_tick is not None:
                self._on_tick()
            with state.cond:
                now = time.monotonic()
                surplus = len(state.parked) - state.demand()
                stale = [lease for lease, since in state.parked if now - since >= linger]
                stale = stale[: max(0, surplus)]
                state.parked = [(lease, s) for lease, s in state.parked if lease not in stale]
                renew = (
                    [lease for lease, _ in state.parked] + [*state.in_use, *state.granted.values()]
                    if now >= next_renewal
                    else []
                )
            for lease in stale:
                state.releases.put(lease)
            self._explain_long_waits()
            if renew:
                next_renewal = now + lease_seconds / 3
                if not state.book.renew(renew):
                    state.api_failed()

    def release(self) -> None:
        """Give queued leases back until `None` arrives, retrying while the API fails."""
        state = self._state
        while (lease := state.releases.get()) is not None:
            state.release_now(lease)

    def _explain_long_waits(self) -> None:
        """The sites waiting longer than `wait_notice` get a line saying who holds the cap,
        once per wait (`explain_wait`, asked here: not in a site's thread, nor under the lock)."""
        state = self._state
        if self._explain_wait is None:
            return
        with state.cond:
            now = time.monotonic()
            due = [
                site
                for site, since in state.waiting_since.items()
                if now - since >= state.settings.wait_notice and site not in state.noticed
            ]
        if not due:
            return
        try:
            line = self._explain_wait()
        except Exception as exc:  # the API failed: say so, the wait goes on
            line = f"who holds the slots of {state.name!r} can't be told: {exc}"
        with state.cond:
            for site in due:
                if site in state.waiting_since:
                    waited = time.monotonic() - state.waiting_since[site]
                    state.notices[site] = f"waiting {waited:.0f}s for a slot: {line}"
                    state.noticed.add(site)
            state.cond.notify_all()
