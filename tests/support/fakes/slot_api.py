"""In-memory concurrency limits that behave like the server's, for `SlotPool` unit tests.

Several `FakeSlotApi` objects may share one `FakeLimit`, like flow runs sharing a server.
A `FakeSlotApi` knows the global limit (any name but its groups') and, by name, its
group limits: an acquire of several names takes a slot
of each or of none, under one lock, like Prefect's `increment-with-lease` (one UPDATE,
rolled back unless every limit had room), and one lease holds all of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from uuid import UUID, uuid4

from flows.slots import ApiUnavailable, SlotError

_SERVER = threading.RLock()  # one lock for every fake limit: multi-name calls are atomic


class FakeLimit:
    """One global concurrency limit: `limit` slots, a lease table, and a record of calls."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.peak = 0
        self.leases: set[UUID] = set()
        self.calls: list[str] = []
        self.times: list[tuple[str, float]] = []  # (call, monotonic time)
        self.lock = _SERVER

    def forget_leases(self) -> None:
        """What a restart does to a server with leases in memory: slots stay counted."""
        with self.lock:
            self.leases.clear()

    def expire(self, lease: UUID) -> None:
        """What the server does to a lease that was not renewed in time."""
        with self.lock:
            self.leases.discard(lease)
            self.active -= 1


class FakeSlotApi:
    """`flows.slots.slot_api.SlotApi` on a `FakeLimit` (the global one) and `groups` (limit
    name -> `FakeLimit`). Set `down` to make every call fail. Set `lease_store_down` for
    Prefect 3.9's server with its lease storage (Redis) gone: an acquire with room counts
    the slot, fails to store the lease and answers 500, keeping the count; a full limit
    still answers 423 (it never reaches the storage); renewals and releases answer 500.
    The calls are recorded on the global limit; `asked` lists the names of every acquire."""

    url = "http://fake.invalid/api"

    def __init__(
        self,
        limit: FakeLimit,
        groups: Mapping[str, FakeLimit] | None = None,
        missing: Sequence[str] = (),
    ) -> None:
        self.limit = limit
        self.groups = dict(groups or {})
        self.missing = set(missing)  # names the server does not know
        self.down: str | None = None
        self.renew_down = False
        self.lease_store_down: str | None = None
        self.asked: list[tuple[str, ...]] = []

    def _call(self, what: str) -> None:
        self.limit.calls.append(what)
        self.limit.times.append((what, time.monotonic()))
        if self.down is not None:
            raise ApiUnavailable(self.down)

    def _limits(self) -> list[FakeLimit]:
        return [self.limit, *self.groups.values()]

    def acquire(self, names: Sequence[str], lease_seconds: float) -> UUID | None:
        self._call("acquire")
        self.asked.append(tuple(names))
        unknown = [name for name in names if name in self.missing]
        if unknown:
            raise SlotError(f"concurrency limit {unknown[0]!r} does not exist or is inactive")
        limits = [self.groups.get(name, self.limit) for name in names]
        with _SERVER:
            if any(limit.active >= limit.limit for limit in limits):
                return None  # all or none, like the server's 423
            lease = uuid4()
            for limit in limits:
                limit.active += 1
                limit.peak = max(limit.peak, limit.active)
                if self.lease_store_down is None:
                    limit.leases.add(lease)
            if self.lease_store_down is not None:
                raise ApiUnavailable(self.lease_store_down)  # counted, never leased
            return lease

    def renew(self, lease: UUID, lease_seconds: float) -> bool:
        self._call("renew")
        if self.renew_down:
            raise ApiUnavailable("HTTP 503 Service Unavailable")
        if self.lease_store_down is not None:
            raise ApiUnavailable(self.lease_store_down)
        with _SERVER:
            return lease in self.limit.leases or any(
                lease in g.leases for g in self.groups.values()
            )

    def release(self, lease: UUID) -> None:
        self._call("release")
        if self.lease_store_down is not None:
            raise ApiUnavailable(self.lease_store_down)
        with _SERVER:
            for limit in self._limits():  # like the server: unknown leases are a no-op
                if lease in limit.leases:
                    limit.leases.discard(lease)
                    limit.active -= 1

    def release_unleased(self, names: Sequence[str], held_seconds: float) -> None:
        self._call("release_unleased")
        with _SERVER:
            for name in names:
                self.groups.get(name, self.limit).active -= 1
