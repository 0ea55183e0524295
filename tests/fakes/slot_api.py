"""An in-memory concurrency limit that behaves like the server's, for `SlotPool` unit tests.

Several `FakeSlotApi` objects may share one `FakeLimit`, like flow runs sharing a server.
"""

from __future__ import annotations

import threading
import time
from uuid import UUID, uuid4

from flows.slots.pool import ApiUnavailable


class FakeLimit:
    """One global concurrency limit: `limit` slots, a lease table, and a record of calls."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.peak = 0
        self.leases: set[UUID] = set()
        self.calls: list[str] = []
        self.times: list[tuple[str, float]] = []  # (call, monotonic time)
        self.lock = threading.Lock()

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
    """`flows.slots.pool.SlotApi` on a `FakeLimit`. Set `down` to make every call fail."""

    url = "http://fake.invalid/api"

    def __init__(self, limit: FakeLimit) -> None:
        self.limit = limit
        self.down: str | None = None
        self.renew_down = False

    def _call(self, what: str) -> None:
        self.limit.calls.append(what)
        self.limit.times.append((what, time.monotonic()))
        if self.down is not None:
            raise ApiUnavailable(self.down)

    def acquire(self, name: str, lease_seconds: float) -> UUID | None:
        self._call("acquire")
        with self.limit.lock:
            if self.limit.active >= self.limit.limit:
                return None
            self.limit.active += 1
            self.limit.peak = max(self.limit.peak, self.limit.active)
            lease = uuid4()
            self.limit.leases.add(lease)
            return lease

    def renew(self, lease: UUID, lease_seconds: float) -> bool:
        self._call("renew")
        if self.renew_down:
            raise ApiUnavailable("HTTP 503 Service Unavailable")
        with self.limit.lock:
            return lease in self.limit.leases

    def release(self, lease: UUID) -> None:
        self._call("release")
        with self.limit.lock:
            if lease in self.limit.leases:  # like the server: unknown leases are a no-op
                self.limit.leases.discard(lease)
                self.limit.active -= 1

    def release_unleased(self, name: str, held_seconds: float) -> None:
        self._call("release_unleased")
        with self.limit.lock:
            self.limit.active -= 1


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    """Poll `predicate()` until it is true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return bool(predicate())  # type: ignore[operator]
