"""The slot pool's Prefect side: the lease endpoints through Prefect's client.

`PrefectSlotApi` (the pool's `SlotApi`) and its `Canary` lease, `ensure_limit`, and how a
failed Prefect API call is told and described. Opening a pool on this API is
`flows.slots.prefect_pool`; reclaiming a dead pool's slots, `flows.slots.reclaim`.

Every call goes through `SyncPrefectClient`: its public methods, or (for the hot
acquire and release calls) its own request path without the retry sleep, which
`flows._prefect_compat` fences. Either way the client adds the auth header and,
on a CSRF-protected server, the CSRF token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError

from flows import _prefect_compat as compat
from flows.slots.ledger import Ledger
from flows.slots.slot_api import ApiUnavailable, SlotError


def ensure_limit(client: SyncPrefectClient, name: str, limit: int) -> str:
    """Create the global concurrency limit `name`, or set its limit. Returns what it did.

    Two runs that start together on a new limit both find it missing; the server's unique
    name lets one create it, and the other, refused (ObjectAlreadyExists), sets the limit
    on the one that exists now. (Prefect's `upsert_global_concurrency_limit_by_name` reads
    and then creates, not atomically: the second run's create failed the run.)"""
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )

    try:
        existing = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit)
            )
            return f"created concurrency limit {name!r} = {limit}"
        except ObjectAlreadyExists:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit))
            return f"concurrency limit {name!r} = {limit} (created meanwhile by another run)"
    if existing.limit != limit:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit))
        return f"updated concurrency limit {name!r}: {existing.limit} -> {limit}"
    return f"concurrency limit {name!r} = {limit} (unchanged)"


def describe_status(response: httpx.Response) -> str:
    """`HTTP 503 Service Unavailable`, for messages."""
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


API_ERRORS = (httpx.HTTPStatusError, httpx.TransportError)
"""A Prefect API call that failed: an error status, or no answer (what `describe_api_error`
describes)."""


def describe_api_error(exc: BaseException) -> str | None:
    """`HTTP 500 Internal Server Error for POST <url>` (a status error) or
    `ConnectError: ... (POST <url>)` (no answer), which names the server; None for an
    exception that is not a failed API call."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"{describe_status(exc.response)} for {exc.request.method} {exc.request.url}"
    if isinstance(exc, httpx.TransportError):
        try:
            where = f" ({exc.request.method} {exc.request.url})"
        except RuntimeError:  # httpx: no request attached
            where = ""
        return f"{type(exc).__name__}: {exc}{where}"
    return None


def may_pass(status_code: int) -> bool:
    """An HTTP status worth retrying (`ApiUnavailable`): 5xx, 401, 403, 408, 429."""
    return status_code >= 500 or status_code in (401, 403, 408, 429)


class PrefectSlotApi:
    """`flows.slots.slot_api.SlotApi` on a Prefect server, for the leases of one holder (a
    flow run)."""

    def __init__(
        self, client: SyncPrefectClient, holder_id: UUID | None = None, *, fast: bool = True
    ) -> None:
        self._client = client
        self._holder = ConcurrencyLeaseHolder(type="flow_run", id=holder_id) if holder_id else None
        self._fast = fast

    @property
    def url(self) -> str:
        return str(self._client.api_url).rstrip("/")

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            response = compat.post_once(self._client, path, body, fast=self._fast)
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"{type(exc).__name__}: {exc}") from None
        if may_pass(response.status_code):
            raise ApiUnavailable(describe_status(response))
        return response

    def acquire(self, names: Sequence[str], lease_seconds: float) -> UUID | None:
        """One lease on a slot of each of `names`, all or none (Prefect 3.9's
        `increment-with-lease` bumps every named limit in one UPDATE and rolls back unless
        all had room: 423 then). The server skips a name it does not know and leases the
        rest, so such a lease goes back at once and this raises `SlotError`."""
        names = [names] if isinstance(names, str) else list(names)
        body: dict[str, Any] = {
            "names": names,
            "slots": 1,
            "mode": "concurrency",
            "lease_duration": lease_seconds,
        }
        if self._holder is not None:
            body["holder"] = self._holder.model_dump(mode="json")
        response = self._post("/v2/concurrency_limits/increment-with-lease", body)
        if response.status_code == 423:  # one of them is full
            return None
        if response.status_code >= 400:
            raise SlotError(
                f"concurrency limit {_listed(names)}: {describe_status(response)}: {response.text}"
            )
        data: dict[str, Any] = response.json()
        known = {str(limit.get("name")) for limit in data.get("limits") or ()}
        missing = [name for name in names if name not in known]
        if missing:
            if known:  # it leased the others: give them back
                self.release(UUID(data["lease_id"]))
            raise SlotError(
                f"concurrency limit {_listed(missing)} does not exist or is inactive; "
                "run `site-pipeline setup` or start the flow again to create it"
            )
        return UUID(data["lease_id"])

    def renew(self, lease: UUID, lease_seconds: float) -> bool:
        response = self._post(
            f"/v2/concurrency_limits/leases/{lease}/renew", {"lease_duration": lease_seconds}
        )
        return response.status_code < 400  # 410 Gone (or 404): the server doesn't know it

    def release(self, lease: UUID) -> None:
        self._post("/v2/concurrency_limits/decrement-with-lease", {"lease_id": str(lease)})

    def canary(self) -> UUID | None:
        """A lease on no limit (`CANARY_NAME` names none), `CANARY_SECONDS` long: it holds no
        slot, and the server forgets it only when it expires or the server restarts with its
        leases in memory (`flows.slots.ledger`). None where the server grants none (the
        server skips a name it does not know; `tests/slots/test_ledger.py` checks it still does)."""
        body: dict[str, Any] = {
            "names": [CANARY_NAME],
            "slots": 1,
            "mode": "concurrency",
            "lease_duration": CANARY_SECONDS,
        }
        if self._holder is not None:
            body["holder"] = self._holder.model_dump(mode="json")
        try:
            response = self._post("/v2/concurrency_limits/increment-with-lease", body)
        except ApiUnavailable:
            return None
        if response.status_code >= 400:
            return None
        data: dict[str, Any] = response.json()
        lease = UUID(data["lease_id"])
        if data.get("limits"):  # someone made a limit of that name: this lease holds a slot
            self.release(lease)
            return None
        return lease

    def release_unleased(self, names: Sequence[str], held_seconds: float) -> None:
        names = [names] if isinstance(names, str) else list(names)
        try:
            self._client.release_concurrency_slots(
                names=names, slots=1, occupancy_seconds=max(0.001, held_seconds)
            )
        except PrefectHTTPStatusError as exc:
            if may_pass(exc.response.status_code):
                raise ApiUnavailable(describe_status(exc.response)) from None
            status = describe_status(exc.response)
            raise SlotError(f"concurrency limit {_listed(names)}: {status}") from None
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"{type(exc).__name__}: {exc}") from None


CANARY_NAME = "site-pipeline canary (a limit that never exists)"
CANARY_SECONDS = 86400.0  # the longest lease Prefect 3.9 grants


class Canary:
    """A pool's canary lease (`PrefectSlotApi.canary`), noted in its ledger; renewed, and
    the ledger marked alive, every `EVERY` seconds (`tick`); released at `close`."""

    EVERY = 3600.0

    def __init__(self, slots: PrefectSlotApi, book: Ledger) -> None:
        self._slots, self._book = slots, book
        self.lease = slots.canary()
        if self.lease is not None:
            book.canary(self.lease)
        self._renewed = time.monotonic()

    def tick(self) -> None:
        if time.monotonic() - self._renewed < self.EVERY:
            return
        self._renewed = time.monotonic()
        self._book.alive()
        if self.lease is not None:
            try:
                self._slots.renew(self.lease, CANARY_SECONDS)
            except ApiUnavailable:
                pass  # the next tick tries again; a day is long

    def close(self) -> None:
        if self.lease is not None:
            try:
                self._slots.release(self.lease)
            except ApiUnavailable:
                pass  # it expires on its own, and holds no slot meanwhile


def _listed(names: Sequence[str]) -> str:
    """`'a'`, or `'a', 'b'`, for messages."""
    return ", ".join(repr(name) for name in names)
