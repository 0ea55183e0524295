"""The slot pool's Prefect side: the concurrency-limit API through Prefect's client.

Every call goes through `SyncPrefectClient`: its public methods, or (for the hot
acquire and release calls) its own request path without the retry sleep, which
`flows._prefect_compat` fences. Either way the client adds the auth header and,
on a CSRF-protected server, the CSRF token.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import get_current_settings

from flows import _prefect_compat as compat
from flows.config import group_limit_name
from flows.process.holders import PID_LABEL
from flows.slots import ledger
from flows.slots.ledger import Ledger
from flows.slots.pool import ApiUnavailable, PoolSettings, SlotError, SlotPool


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
    """`flows.slots.pool.SlotApi` on a Prefect server, for the leases of one holder (a flow run)."""

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


def _listed(names: Sequence[str]) -> str:
    """`'a'`, or `'a', 'b'`, for messages."""
    return ", ".join(repr(name) for name in names)


class TagCheckShortcut:
    """Spare the task engine its per-task-run tag-limit check while no tag limit exists.

    Every task run with tags asks the server for slots of `tag:<tag>` limits. With no such
    limit the answer is cached for only 5 s; on SQLite the refresh can get a 503 and the
    client's ~2 s retry sleep, stalling every task run behind it. Only while a read (which
    SQLite never refuses) says no `tag:<tag>` limit exists for any of `tags`, this keeps
    that cache entry fresh (`flows._prefect_compat`, use 2). If someone creates such a
    limit, the next check (every `recheck` seconds) stops the shortcut and Prefect enforces
    the limit as usual.
    """

    def __init__(self, client: SyncPrefectClient, tags: Sequence[str], recheck: float = 10.0):
        self._client = client
        self._names = frozenset(f"tag:{tag}" for tag in tags)
        self._recheck = recheck
        self._checked_at = -recheck
        self._active = False

    def refresh(self) -> None:
        """Call every second or so."""
        if not self._names or not compat.tag_cache_available():
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
            compat.mark_no_tag_limits(self._names)


def site_limit_names(name: str, groups: Mapping[str, str]) -> dict[str, str]:
    """Each site of `groups` (site -> group): its group's limit name under the limit `name`,
    as a `SlotPool`'s `site_groups` takes it."""
    return {site: group_limit_name(name, group) for site, group in groups.items()}


def open_slot_pool(
    name: str,
    sites: Sequence[str],
    *,
    holder_id: UUID | None,
    prefetch: int = 0,
    patience: float = 2.0,
    park: bool = True,
    api_patience: float = 300.0,
    tags: Sequence[str] = (),
    groups: Mapping[str, str] | None = None,
    group_limits: Mapping[str, int] | None = None,
) -> SlotPool:
    """A `SlotPool` on the current Prefect API, with a client of its own that `close()`
    closes after giving every lease back.

    `groups` maps a site to its group (`RunPlan.group_of`), `group_limits` a group to its
    cap (`RunPlan.group_limits`): a group's sites take a slot of its limit
    (`group_limit_name(name, group)`) and of `name` in one call."""
    client = get_client(sync_client=True)
    client.__enter__()
    try:
        shortcut = TagCheckShortcut(client, tags)
        shortcut.refresh()
        return SlotPool(
            name,
            sites,
            PrefectSlotApi(client, holder_id),
            PoolSettings(patience=patience, api_patience=api_patience),
            prefetch=prefetch,
            park=park,
            on_tick=shortcut.refresh,
            on_close=lambda: client.__exit__(None, None, None),
            ledger=Ledger(ledger_folder(), str(holder_id), ledger_api()),
            site_groups=site_limit_names(name, groups or {}),
            group_caps={group_limit_name(name, g): cap for g, cap in (group_limits or {}).items()},
        )
    except BaseException:
        client.__exit__(None, None, None)
        raise


def ledger_folder() -> Path:
    """Where this host's slot pools list their leases (`flows.slots.ledger`)."""
    return Path(get_current_settings().home) / "site-pipeline" / "leases"


def ledger_api() -> str:
    """Which API a ledger's leases belong to: its URL, or the embedded default's database
    (each ad hoc run starts its own temporary server on it)."""
    settings = get_current_settings()
    if settings.api.url:
        return str(settings.api.url).rstrip("/")
    database = settings.server.database.connection_url
    where = database.get_secret_value() if database else str(settings.home)
    # A digest: the database URL may hold a password, and this goes into a file.
    return f"embedded {hashlib.sha256(where.encode()).hexdigest()[:16]}"


def reclaim(client: SyncPrefectClient, dry_run: bool = False) -> list[str]:
    """Give back the slots that pools of dead processes on this host still held; one line
    per dead pool, saying what was (or, with `dry_run`, would be) given back.

    On the embedded default the dead run's temporary server died with it, and its leases
    with it: each slot is given back by name. On a URL's server a lease it still knows
    (expired: no lease expiry service runs there) is released; one it no longer knows was
    already freed by its expiry service (`prefect server start` runs one), or lost in a
    restart of a server that keeps leases in memory, and is left alone.
    """
    api = ledger_api()
    slots = PrefectSlotApi(client)
    lines = []
    for orphan in ledger.orphans(ledger_folder(), api):
        if not orphan.leases:  # it held nothing when it died
            if not dry_run:
                orphan.path.unlink(missing_ok=True)
            continue
        given = 0
        for lease, names in orphan.leases.items():
            if dry_run:
                given += 1
                continue
            if api.startswith("embedded "):
                slots.release_unleased(names, held_seconds=0.001)
                given += 1
            elif slots.renew(lease, 60.0):
                slots.release(lease)
                given += 1
        verb = "would give back" if dry_run else "gave back"
        lines.append(
            f"{verb} {given} of {len(orphan.leases)} slot(s) held by flow run {orphan.holder}, "
            f"whose process ({orphan.labels.get(PID_LABEL, '?')}) is gone"
        )
        if not dry_run:
            orphan.path.unlink(missing_ok=True)
    return lines
