"""Slots of a Prefect global concurrency limit, shared by one flow run's threads.

Why not Prefect's automatic tag limit? The task engine takes a tag slot when a
task run starts and keeps it through every retry delay sleep, and each
acquisition goes through one serialized queue that sleeps the server's
`Retry-After` (seconds, scaled by the average slot occupancy) whenever the limit
is full, so freed slots sit idle. Here:

- A slot is taken right before a pipeline process starts and given back when it
  ends, so a site sleeping before its retry holds nothing.
- A slot given back while another thread of this flow run waits is handed to it
  directly, with no API call. One that nobody here waits for is kept ("parked")
  for at most `linger` seconds, and only while this run still has sites to start;
  then it goes back to the server, where other flow runs can take it.
- One thread at a time asks the server for a new slot, polling every `poll`
  seconds while the limit is full.
- Leases are renewed by one keeper thread, so a pipeline may run for hours.

The limit itself stays a normal global concurrency limit: the UI and
`prefect gcl ls` show it, and it caps every flow run that uses it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder

logger = logging.getLogger("site_pipeline.slots")

LEASE_SECONDS = 60.0  # the server's minimum; renewed every third of it


class SlotError(RuntimeError):
    """The concurrency limit can't be used (it does not exist, or the API refused)."""


def ensure_limit(client: SyncPrefectClient, name: str, limit: int) -> str:
    """Create the global concurrency limit `name`, or set its limit. Returns what it did."""
    from prefect.exceptions import ObjectNotFound

    try:
        existing = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        existing = None
    client.upsert_global_concurrency_limit_by_name(name, limit)
    if existing is None:
        return f"created concurrency limit {name!r} = {limit}"
    if existing.limit != limit:
        return f"updated concurrency limit {name!r}: {existing.limit} -> {limit}"
    return f"concurrency limit {name!r} = {limit} (unchanged)"


class SlotPool:
    """Slots of the global concurrency limit `name` for one flow run.

    Worker threads never call the API to get a slot: they wait on a condition
    for a parked lease. A broker thread asks the server whenever more threads
    wait than leases are parked, so a slow API call (SQLite's HTTP 503 and the
    client's retry) never keeps a waiting thread from a slot freed meanwhile.
    """

    def __init__(
        self,
        name: str,
        sites: int,
        holder_id: UUID | None = None,
        *,
        linger: float = 1.0,
        poll: float = 0.2,
        client: SyncPrefectClient | None = None,
    ) -> None:
        self.name = name
        self._linger = linger
        self._poll = poll
        self._holder = ConcurrencyLeaseHolder(type="flow_run", id=holder_id) if holder_id else None
        self._own_client = client is None
        self._client = client or get_client(sync_client=True)
        if self._own_client:
            self._client.__enter__()
        self._cond = threading.Condition()
        self._parked: list[tuple[UUID, float]] = []
        self._in_use: set[UUID] = set()
        self._waiting = 0
        self._unfinished = sites
        self._closed = False
        self._error: SlotError | None = None
        self._stopped = threading.Event()
        self.api_acquisitions = 0  # how many slots came from the server (for benchmarks)
        self._threads = [
            threading.Thread(target=self._broker, name=f"slots-broker-{name}", daemon=True),
            threading.Thread(target=self._keeper, name=f"slots-keeper-{name}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- public ---------------------------------------------------------------

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of the block."""
        lease = self._acquire()
        try:
            yield
        finally:
            self._give_back(lease)

    def site_finished(self) -> None:
        """A site reached its final outcome: it will not ask for a slot again."""
        with self._cond:
            self._unfinished -= 1

    def close(self) -> None:
        """Give every lease back to the server and stop the pool's threads."""
        with self._cond:
            self._closed = True
            leases = [lease for lease, _ in self._parked] + list(self._in_use)
            self._parked.clear()
            self._in_use.clear()
            self._cond.notify_all()
        self._stopped.set()
        for lease in leases:
            self._release(lease)
        for thread in self._threads:
            thread.join(timeout=10)
        if self._own_client:
            self._client.__exit__(None, None, None)

    # -- internals ------------------------------------------------------------

    def _acquire(self) -> UUID:
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()  # wake the broker
            try:
                while not self._parked:
                    if self._error is not None:
                        raise self._error
                    if self._closed:
                        raise SlotError(f"slot pool for {self.name!r} is closed")
                    self._cond.wait()
                lease, _ = self._parked.pop()
                self._in_use.add(lease)
                return lease
            finally:
                self._waiting -= 1

    def _give_back(self, lease: UUID) -> None:
        with self._cond:
            self._in_use.discard(lease)
            # Keep it (briefly) only while a thread waits or a site of this run may ask.
            keep = not self._closed and (
                self._waiting > len(self._parked) or self._unfinished > len(self._in_use)
            )
            if keep:
                self._parked.append((lease, time.monotonic()))
                self._cond.notify_all()
                return
        self._release(lease)

    def _broker(self) -> None:
        """Ask the server for a slot whenever more threads wait than leases are parked."""
        while True:
            with self._cond:
                while not self._closed and self._waiting <= len(self._parked):
                    self._cond.wait()
                if self._closed:
                    return
            try:
                lease, retry_after = self._ask_server()
            except SlotError as exc:
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            except Exception as exc:  # a transient API error: say so and try again
                logger.warning("asking for a slot of %r failed: %s", self.name, exc)
                lease, retry_after = None, self._poll
            with self._cond:
                if lease is not None:
                    self.api_acquisitions += 1
                    if self._closed:
                        closed_lease = lease
                    else:
                        self._parked.append((lease, time.monotonic()))
                        self._cond.notify_all()
                        continue
                else:
                    # Full: wait for the next poll (a local hand-over needs no broker).
                    self._cond.wait(min(retry_after, self._poll) * random.uniform(0.8, 1.2))  # noqa: S311
                    continue
            self._release(closed_lease)
            return

    def _ask_server(self) -> tuple[UUID | None, float]:
        """One non-blocking try: (lease id, 0) or (None, Retry-After seconds)."""
        try:
            response = self._client.increment_concurrency_slots_with_lease(
                names=[self.name],
                slots=1,
                mode="concurrency",
                lease_duration=LEASE_SECONDS,
                holder=self._holder,
            )
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:
                return None, float(exc.response.headers.get("Retry-After", self._poll))
            if exc.response.status_code in (404, 422):
                raise SlotError(f"concurrency limit {self.name!r}: the API said {exc}") from exc
            raise
        data: dict[str, Any] = response.json()
        if not data.get("limits"):
            raise SlotError(
                f"concurrency limit {self.name!r} does not exist or is inactive; "
                "run `site-pipeline setup` or start the flow again to create it"
            )
        return UUID(data["lease_id"]), 0.0

    def _release(self, lease: UUID) -> None:
        try:
            self._client.release_concurrency_slots_with_lease(lease)
        except Exception as exc:  # the lease expires by itself on the server
            logger.warning("could not release slot lease %s of %r: %s", lease, self.name, exc)

    def _keeper(self) -> None:
        """Return slots parked longer than `linger` seconds, and renew held leases."""
        next_renewal = time.monotonic() + LEASE_SECONDS / 3
        while not self._stopped.wait(min(self._linger / 2, 0.25)):
            with self._cond:
                now = time.monotonic()
                surplus = len(self._parked) - self._waiting
                stale = [lease for lease, since in self._parked if now - since >= self._linger][
                    : max(0, surplus)
                ]
                self._parked = [(lease, s) for lease, s in self._parked if lease not in stale]
                renew = (
                    [lease for lease, _ in self._parked] + list(self._in_use)
                    if now >= next_renewal
                    else []
                )
            for lease in stale:
                self._release(lease)
            if renew:
                next_renewal = now + LEASE_SECONDS / 3
                for lease in renew:
                    try:
                        self._client.renew_concurrency_lease(lease, LEASE_SECONDS)
                    except Exception as exc:
                        logger.warning(
                            "could not renew slot lease %s of %r: %s", lease, self.name, exc
                        )
