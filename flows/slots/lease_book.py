"""The lease book: the slot leases one pool holds, noted, renewed and given back.

Plain Python. Each lease the server grants is noted here (and in the pool's `LeaseLedger`,
`flows.slots.ledger`, for cleanup after a crash); the upkeep thread renews them through the book,
and the hand-out and the releaser give them back through it. A server that restarts with
leases in memory forgets them but still counts their slots: the book tells such a lost lease
from an expired one and gives its slot back by name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from flows.slots.slot_api import ApiUnavailable, SlotApi

logger = logging.getLogger("site_pipeline.slots")


class LeaseLedger(Protocol):
    """Where the pool notes each lease it holds (`flows.slots.ledger`), for crash cleanup."""

    def asking(self, names: Sequence[str]) -> None: ...

    def answered(self) -> None: ...

    def held(self, lease: UUID, names: Sequence[str]) -> None: ...

    def given_back(self, lease: UUID) -> None: ...

    def close(self) -> None: ...


@dataclass
class _Lease:
    acquired_at: float  # for fair_share
    confirmed_at: float  # the last time the server said it knew this lease
    names: tuple[str, ...]  # the limits it holds a slot of
    lost: bool = False  # the server forgot it (a restart) but still counts its slot


class LeaseBook:
    """The leases one pool holds: noting, renewing and giving them back to the server.

    A server that restarts with leases in memory forgets them but still counts their
    slots; a lease it no longer knows, though it confirmed it less than a lease duration
    ago, was lost that way, and its slot is given back by name."""

    def __init__(
        self, name: str, api: SlotApi, lease_seconds: float, ledger: LeaseLedger | None
    ) -> None:
        self.name = name
        self._api = api
        self._lease_seconds = lease_seconds
        self._ledger = ledger
        self._leases: dict[UUID, _Lease] = {}

    def asking(self, names: Sequence[str]) -> None:
        """An acquire of `names` is about to go out: until `took` or `refused`, the ledger
        counts it as possibly held (a crash cleanup never takes a slot in flight)."""
        if self._ledger is not None:
            self._ledger.asking(names)

    def refused(self) -> None:
        """The acquire `asking` announced got nothing."""
        if self._ledger is not None:
            self._ledger.answered()

    def took(self, lease: UUID, now: float, names: Sequence[str] = ()) -> None:
        """The server granted `lease` at `now`, on `names` (default: this book's limit)."""
        held = tuple(names) or (self.name,)
        self._leases[lease] = _Lease(acquired_at=now, confirmed_at=now, names=held)
        if self._ledger is not None:
            self._ledger.held(lease, held)

    def acquired_at(self, lease: UUID) -> float | None:
        """When `lease` was granted; None once it went back."""
        info = self._leases.get(lease)
        return None if info is None else info.acquired_at

    def give_back(self, lease: UUID) -> None:
        """Release `lease`; if the server lost it (a restart), give its slot back by name.

        Raises `ApiUnavailable`, or `SlotError` when the server refuses for good."""
        info = self._leases.get(lease)
        if info is None:
            return
        # The server answers "done" to a release of a lease it doesn't know, so ask first.
        if not info.lost and self._api.renew(lease, self._lease_seconds):
            self._api.release(lease)
        elif info.lost or self._lost(lease, info):
            self._api.release_unleased(info.names, time.monotonic() - info.acquired_at)
        del self._leases[lease]
        if self._ledger is not None:
            self._ledger.given_back(lease)

    def renew(self, leases: list[UUID]) -> bool:
        """Extend `leases` on the server, noting the ones it lost; False when the API failed
        for any of them."""
        answered = True
        for lease in leases:
            try:
                known = self._api.renew(lease, self._lease_seconds)
            except ApiUnavailable as exc:
                answered = False
                logger.warning(
                    "could not renew slot lease %s of %r at %s: %s",
                    lease,
                    self.name,
                    self._api.url,
                    exc.status,
                )
                continue
            info = self._leases.get(lease)
            if info is None or info.lost:
                continue
            if known:
                info.confirmed_at = time.monotonic()
            else:
                self._lost(lease, info)
        return answered

    def close(self) -> None:
        """Close the ledger, if every lease went back (else its file stays, for cleanup)."""
        if self._ledger is not None and not self._leases:
            self._ledger.close()

    def _lost(self, lease: UUID, info: _Lease) -> bool:
        """The server doesn't know `lease`: lost in a restart (True) or expired (False)."""
        info.lost = time.monotonic() - info.confirmed_at < self._lease_seconds
        if info.lost:
            logger.warning(
                "the server at %s no longer knows slot lease %s of %r (did it restart?); "
                "its slot is given back by name",
                self._api.url,
                lease,
                self.name,
            )
        else:
            logger.warning("slot lease %s of %r expired on the server", lease, self.name)
        return info.lost
