"""Slots of a Prefect global concurrency limit, shared by one flow run's threads.

Why not Prefect's automatic tag limit? Reading Prefect 3.9's source:

- The task engine takes the tag's slot when a task run starts (`_concurrency(...)`
  around `begin_run()` in `task_engine.py`) and keeps it through every retry
  delay sleep, so a site waiting to retry blocks a slot.
- Acquisitions for one set of limit names go through one serialized queue
  (`ConcurrencySlotAcquisitionWithLeaseService`). When the limit is full the
  server answers 423 with a `Retry-After` scaled by the average slot occupancy,
  and the queue sleeps that long, so a freed slot sits idle meanwhile.
- On SQLite, the increment runs in a DEFERRED transaction that reads, then
  writes; when another writer got in between, SQLite fails it at once with
  "database is locked", the API answers 503, and the Prefect client retries
  only after `2 ** n` seconds (about 2 s, jittered). The serialized queue waits
  behind that sleep too.

Here instead:

- A slot is taken right before a pipeline process starts and given back when it
  ends, so a site sleeping before its retry holds nothing.
- Worker threads never call the API for a slot: a broker thread asks the
  server while more threads wait than slots are parked, without the client's
  retry sleep, and tries again after `poll` seconds itself, so a 503 costs a
  few milliseconds, not two seconds.
- A slot given back while a thread of this run waits goes straight to it, with
  no API call. One nobody waits for is parked for at most `linger` seconds, and
  only while this run has sites left; then it goes back to the server. A slot
  held (across hand-overs) for more than `fair_share` seconds goes back to the
  server when its pipeline ends, so a concurrent flow run on the same tag gets
  its turn instead of waiting for this run's whole queue.
- Slots go to sites in list order: with k slots free, a site's first attempt
  waits until all but k - 1 of the sites before it have started (for at most
  `patience` seconds, so a site that never asks can't block the others).
  Retries of started sites come first.
- One keeper thread renews the leases, so a pipeline may run for hours, and one
  releaser thread gives slots back, so a worker thread never waits on the API.

The limit stays a normal global concurrency limit: the UI and `prefect gcl ls`
show it, and it caps every flow run that uses it.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
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


class TagCheckShortcut:
    """Spare the task engine its per-task-run tag-limit check while no tag limit exists.

    Every task run with tags asks the server for slots of `tag:<tag>` limits
    (`task_engine.py`, `_concurrency(names=["tag:..."])`), through one serialized
    queue per process. With no such limit the answer is cached for only 5 s
    (`prefect.concurrency.services._no_limits_cache`); on SQLite the refresh can get
    a 503 and the client's ~2 s retry sleep, stalling every task run behind it.

    Only while a check through the API (a read, which SQLite never refuses) says no
    `tag:<tag>` limit exists for any of `tags`, this keeps that cache entry fresh.
    If someone creates such a limit, the next check (every `recheck` seconds) stops
    the shortcut and Prefect enforces the limit as usual.
    """

    def __init__(self, client: SyncPrefectClient, tags: Sequence[str], recheck: float = 10.0):
        self._client = client
        self._names = frozenset(f"tag:{tag}" for tag in tags)
        self._recheck = recheck
        self._checked_at = -recheck
        self._active = False

    def refresh(self) -> None:
        """Call every second or so."""
        from prefect.concurrency import services
        from prefect.exceptions import ObjectNotFound

        cache = getattr(services, "_no_limits_cache", None)
        if cache is None or not self._names:
            return
        now = time.monotonic()
        if now - self._checked_at >= self._recheck:
            self._checked_at = now
            active = True
            for name in self._names:
                try:
                    self._client.read_global_concurrency_limit_by_name(name)
                    active = False  # a tag limit exists: Prefect must enforce it
                except ObjectNotFound:
                    pass
                except Exception:  # can't tell: leave Prefect to it
                    active = False
            self._active = active
        if self._active:
            with getattr(services, "_cache_lock", threading.Lock()):
                cache[self._names] = True


def _post_once(client: SyncPrefectClient, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST through the Prefect client's connection and auth, but without its retries.

    On a retryable status (503: SQLite busy) Prefect's client sleeps about 2 s before
    it even checks whether retries are left, so `PREFECT_CLIENT_MAX_RETRIES=0` does
    not help. The broker polls every few milliseconds itself instead.
    """
    http = getattr(client, "_client", None)
    if not isinstance(http, httpx.Client):  # pragma: no cover - a Prefect without it
        return client.request("POST", path, json=body)  # type: ignore[arg-type]
    return httpx.Client.send(http, http.build_request("POST", path, json=body))


class SlotPool:
    """Slots of the global concurrency limit `name` for one flow run over `sites`."""

    def __init__(
        self,
        name: str,
        sites: Sequence[str],
        holder_id: UUID | None = None,
        *,
        linger: float = 1.0,
        poll: float = 0.05,
        patience: float = 2.0,
        fair_share: float = 30.0,
        prefetch: int = 0,
        tags: Sequence[str] = (),
        client: SyncPrefectClient | None = None,
    ) -> None:
        self.name = name
        self._index = {site: i for i, site in enumerate(sites)}
        self._linger = linger
        self._poll = poll
        self._patience = patience
        self._fair_share = fair_share
        self._leased_at: dict[UUID, float] = {}
        self._holder = ConcurrencyLeaseHolder(type="flow_run", id=holder_id) if holder_id else None
        self._own_client = client is None
        self._client = client or get_client(sync_client=True)
        if self._own_client:
            self._client.__enter__()
        self._cond = threading.Condition()
        self._parked: list[tuple[UUID, float]] = []
        self._in_use: set[UUID] = set()
        self._waiting: dict[int, float] = {}  # site index -> when it began to wait
        self._started: set[int] = set()
        self._finished: set[int] = set()
        self._frontier = 0  # lowest index that has neither started nor finished
        # Slots to ask for before any thread waits, while Prefect still sets up the task runs.
        self._prefetch = min(prefetch, len(sites))
        self._closed = False
        self._error: SlotError | None = None
        self._stopped = threading.Event()
        self._tag_shortcut = TagCheckShortcut(self._client, tags)
        self._tag_shortcut.refresh()
        self._releases: queue.SimpleQueue[UUID | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._broker, name=f"slots-broker-{name}", daemon=True),
            threading.Thread(target=self._keeper, name=f"slots-keeper-{name}", daemon=True),
            threading.Thread(target=self._releaser, name=f"slots-release-{name}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- public ---------------------------------------------------------------

    @contextmanager
    def slot(self, site: str) -> Iterator[None]:
        """Hold one slot for `site` for the duration of the block."""
        lease = self._acquire(self._index[site])
        try:
            yield
        finally:
            self._give_back(lease)

    def site_finished(self, site: str) -> None:
        """`site` reached its final outcome: it will not ask for a slot again."""
        with self._cond:
            self._finished.add(self._index[site])
            self._advance()
            self._cond.notify_all()

    def close(self) -> None:
        """Give every lease back to the server and stop the pool's threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._stopped.set()
        broker, keeper, releaser = self._threads
        broker.join(timeout=10)  # it may still bring one lease; it releases that itself
        keeper.join(timeout=10)
        with self._cond:
            leases = [lease for lease, _ in self._parked] + list(self._in_use)
            self._parked.clear()
            self._in_use.clear()
        for lease in leases:
            self._release(lease)
        self._releases.put(None)
        releaser.join(timeout=35)
        if self._own_client:
            self._client.__exit__(None, None, None)

    # -- internals (call with the lock held where noted) ----------------------

    def _advance(self) -> None:
        # Lock held.
        while self._frontier in self._started or self._frontier in self._finished:
            self._frontier += 1

    def _next_in_line(self, now: float) -> int | None:
        """The waiting site that gets the next slot (lock held)."""
        # With k slots parked, the first k sites not yet started may take them in any
        # order (no one behind them waits for nothing); with one, it's the next in line.
        horizon = self._frontier + max(0, len(self._parked) - 1)
        eligible = [
            index
            for index, since in self._waiting.items()
            if index in self._started or index <= horizon or now - since >= self._patience
        ]
        return min(eligible) if eligible else None

    def _acquire(self, index: int) -> UUID:
        with self._cond:
            self._waiting[index] = time.monotonic()
            self._cond.notify_all()  # wake the broker
            try:
                while True:
                    if self._error is not None:
                        raise self._error
                    if self._closed:
                        raise SlotError(f"slot pool for {self.name!r} is closed")
                    if self._parked and self._next_in_line(time.monotonic()) == index:
                        break
                    # Timed wait: `patience` can make this site eligible with no notify.
                    self._cond.wait(self._patience / 4)
                lease, _ = self._parked.pop()
                self._in_use.add(lease)
                self._started.add(index)
                self._advance()
                self._cond.notify_all()
                return lease
            finally:
                del self._waiting[index]

    def _give_back(self, lease: UUID) -> None:
        with self._cond:
            self._in_use.discard(lease)
            unfinished = len(self._index) - len(self._finished)
            # Keep it (briefly) only while a thread waits or a site of this run may ask,
            # and only for `fair_share` seconds in all: then other flow runs get a turn.
            fresh = time.monotonic() - self._leased_at.get(lease, 0.0) < self._fair_share
            keep = (
                not self._closed
                and fresh
                and (len(self._waiting) > len(self._parked) or unfinished > len(self._in_use))
            )
            if keep:
                self._parked.append((lease, time.monotonic()))
                self._cond.notify_all()
                return
        self._release(lease)

    def _broker(self) -> None:
        """Ask the server for a slot whenever more threads wait than slots are parked."""
        while True:
            with self._cond:
                while not self._closed and self._demand() <= len(self._parked):
                    self._cond.wait()
                if self._closed:
                    return
            try:
                lease = self._ask_server()
            except SlotError as exc:
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                if lease is None:
                    # Full or busy: wait for the next poll (a local hand-over needs no broker).
                    self._cond.wait(self._poll * random.uniform(0.8, 1.2))  # noqa: S311
                    continue
                self._leased_at[lease] = time.monotonic()
                self._prefetch = max(0, self._prefetch - 1)
                if not self._closed:
                    self._parked.append((lease, time.monotonic()))
                    self._cond.notify_all()
                    continue
            self._release(lease)
            return

    def _demand(self) -> int:
        """How many slots this run wants parked right now (lock held)."""
        return max(len(self._waiting), self._prefetch)

    def _ask_server(self) -> UUID | None:
        """One try, no client retries: a lease id, or None when full or busy."""
        body: dict[str, Any] = {
            "names": [self.name],
            "slots": 1,
            "mode": "concurrency",
            "lease_duration": LEASE_SECONDS,
        }
        if self._holder is not None:
            body["holder"] = self._holder.model_dump(mode="json")
        try:
            response = _post_once(self._client, "/v2/concurrency_limits/increment-with-lease", body)
        except httpx.TransportError as exc:
            logger.warning("asking for a slot of %r failed, trying again: %s", self.name, exc)
            time.sleep(1)
            return None
        code = response.status_code
        if code == 423 or code == 429 or code >= 500:  # full, or SQLite busy (503)
            return None
        if code >= 400:
            raise SlotError(f"concurrency limit {self.name!r}: the API said {code} {response.text}")
        data: dict[str, Any] = response.json()
        if not data.get("limits"):
            raise SlotError(
                f"concurrency limit {self.name!r} does not exist or is inactive; "
                "run `site-pipeline setup` or start the flow again to create it"
            )
        return UUID(data["lease_id"])

    def _release(self, lease: UUID) -> None:
        """Queue `lease` for the releaser thread: a worker thread never waits on the API."""
        self._leased_at.pop(lease, None)
        self._releases.put(lease)

    def _releaser(self) -> None:
        """Give queued leases back, retrying busy answers quickly, until `None` arrives."""
        while (lease := self._releases.get()) is not None:
            deadline = time.monotonic() + 30
            while True:
                try:
                    response = _post_once(
                        self._client,
                        "/v2/concurrency_limits/decrement-with-lease",
                        {"lease_id": str(lease)},
                    )
                    code = response.status_code
                    error = f"HTTP {code}" if code == 429 or code >= 500 else None
                except httpx.TransportError as exc:
                    error = str(exc)
                if error is None:
                    break  # released, or the server no longer knows it (expired)
                if time.monotonic() > deadline:  # the lease expires by itself on the server
                    logger.warning(
                        "could not release slot lease %s of %r: %s", lease, self.name, error
                    )
                    break
                time.sleep(self._poll)

    def _keeper(self) -> None:
        """Return slots parked longer than `linger` seconds, and renew held leases."""
        next_renewal = time.monotonic() + LEASE_SECONDS / 3
        while not self._stopped.wait(min(self._linger / 2, 0.25)):
            self._tag_shortcut.refresh()
            with self._cond:
                now = time.monotonic()
                surplus = len(self._parked) - self._demand()
                stale = [lease for lease, since in self._parked if now - since >= self._linger]
                stale = stale[: max(0, surplus)]
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
