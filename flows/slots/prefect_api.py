"""The slot pool's Prefect side: the concurrency-limit API through Prefect's client.

Every call goes through `SyncPrefectClient`: its public methods, or (for the hot
acquire and release calls) its own request path without the retry sleep, which
`flows._prefect_compat` fences. Either way the client adds the auth header and,
on a CSRF-protected server, the CSRF token.
"""

from __future__ import annotations

import hashlib
import os
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
from flows.process.holders import HOST_LABEL, PID_LABEL
from flows.slots import ledger
from flows.slots.ledger import Ledger
from flows.slots.pool import SlotPool
from flows.slots.pool_state import PoolSettings
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
    """`flows.slots.slot_api.SlotApi` on a Prefect server, for the leases of one holder (a flow run)."""

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
        server skips a name it does not know; `tests/test_ledger.py` checks it still does)."""
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
    wait_notice: float = 60.0,
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
        slots = PrefectSlotApi(client, holder_id)
        book = Ledger(ledger_folder(), str(holder_id), ledger_api())
        canary = Canary(slots, book)

        def tick() -> None:
            shortcut.refresh()
            canary.tick()

        def close() -> None:
            canary.close()
            client.__exit__(None, None, None)

        return SlotPool(
            name,
            sites,
            slots,
            PoolSettings(patience=patience, api_patience=api_patience, wait_notice=wait_notice),
            prefetch=prefetch,
            park=park,
            on_tick=tick,
            on_close=close,
            ledger=book,
            site_groups=site_limit_names(name, groups or {}),
            group_caps={group_limit_name(name, g): cap for g, cap in (group_limits or {}).items()},
            explain_wait=lambda: holders_line(client, name, holder_id),
        )
    except BaseException:
        client.__exit__(None, None, None)
        raise


def ledger_folder() -> Path:
    """Where this host's slot pools list their leases (`flows.slots.ledger`)."""
    return Path(get_current_settings().home) / "site-pipeline" / "leases"


LOCAL_SERVER_ENV = "SITE_PIPELINE_LOCAL_SERVER"
"""The kept local server's URL, set by `flows.ops.server.use_local_server` for the command
and what it starts: that server is the embedded default's (this PREFECT_HOME's database),
whatever port it listens on this time."""


def ledger_api() -> str:
    """Which server a ledger's leases belong to: its URL, or for the embedded default (a
    temporary server, or the kept local server, each restart on another port) its database."""
    settings = get_current_settings()
    url = str(settings.api.url or "").rstrip("/")
    if url and url != os.environ.get(LOCAL_SERVER_ENV, "").rstrip("/"):
        return url
    database = settings.server.database.connection_url
    where = database.get_secret_value() if database else str(settings.home)
    # A digest: the database URL may hold a password, and this goes into a file.
    return f"embedded {hashlib.sha256(where.encode()).hexdigest()[:16]}"


def on_embedded_default() -> bool:
    """The API is this PREFECT_HOME's own server, which listens on loopback only: every
    process that can hold its slots runs on this host and notes them in `ledger_folder()`."""
    return ledger_api().startswith("embedded ")


def reclaim(
    client: SyncPrefectClient, dry_run: bool = False, names: Sequence[str] = ()
) -> list[str]:
    """Give back the slots that no live process holds; one line per dead pool, and per limit
    of `names` (or held in a ledger) with slots nobody holds, saying what was (or, with
    `dry_run`, would be) given back.

    1. A dead pool's lease the server still knows is released. One it no longer knows either
       expired (the server's lease expiry gave its slot back) or was lost when the server
       restarted with its leases in memory (its slot still counts): the pool's canary lease
       tells which (`_lost_in_restart`). A lost one's slot is given back by name.
    2. On the embedded default every holder is a process of this host with a ledger here, so
       each limit's slots in use beyond what live pools hold or are asking for are held by
       nobody (a ledger of an older version, an ask a crash cut short): given back by name.
       On another server a slot no ledger here explains may be another host's: left alone.
    """
    api, folder = ledger_api(), ledger_folder()
    slots = PrefectSlotApi(client)
    lines = []
    for orphan in ledger.orphans(folder, api):
        lines += _reclaim(slots, orphan, dry_run)
    if on_embedded_default() and serves_this_home(client):
        lines += _reclaim_unheld(client, slots, [*names], dry_run)
    return lines


def serves_this_home(client: SyncPrefectClient) -> bool:
    """The server says (`GET /admin/settings`) it runs for this PREFECT_HOME: the check that
    a URL taken for the embedded default's really is this home's server (not another
    home's, which took the port a moment before). False when it can't tell."""
    try:
        response = client.request("GET", "/admin/settings")
        response.raise_for_status()
        home = Path(str(response.json()["home"]))
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False
    return home.resolve() == Path(get_current_settings().home).resolve()


def _reclaim(slots: PrefectSlotApi, orphan: ledger.Orphan, dry_run: bool) -> list[str]:
    """Give back what one dead pool held (see `reclaim`); its line, if it held anything."""
    given = 0
    lost: bool | None = None
    for lease, names in orphan.leases.items():
        if dry_run:
            given += 1
        elif slots.renew(lease, 60.0):
            slots.release(lease)
            given += 1
        else:
            if lost is None:
                lost = _lost_in_restart(slots, orphan)
            if lost:
                slots.release_unleased(names, held_seconds=0.001)
                given += 1
    if not dry_run:
        if orphan.canary is not None and slots.renew(orphan.canary, 60.0):
            slots.release(orphan.canary)
        orphan.path.unlink(missing_ok=True)
    if not orphan.leases:  # it held nothing when it died
        return []
    verb = "would give back" if dry_run else "gave back"
    line = (
        f"{verb} {given} of {len(orphan.leases)} slot(s) held by flow run {orphan.holder}, "
        f"whose process ({orphan.labels.get(PID_LABEL, '?')}) is gone"
    )
    if given < len(orphan.leases):
        line += (
            "; the server's lease expiry gave the rest back"
            if lost is False
            else "; the rest: the server no longer knows their leases (expired, or lost in a "
            "restart: its canary can't tell)"
        )
    return [line]


def _lost_in_restart(slots: PrefectSlotApi, orphan: ledger.Orphan) -> bool | None:
    """Whether the server lost the dead pool's leases in a restart (their slots still count)
    rather than let them expire (their slots went back): the pool's canary, a lease on no
    limit that lasts `CANARY_SECONDS` and that the pool renewed while it ran, is gone too
    only after a restart, if the pool was seen within that time. None: can't tell (no
    canary, or seen too long ago)."""
    if orphan.canary is None:
        return None
    if slots.renew(orphan.canary, 60.0):
        return False
    if time.time() - orphan.seen < CANARY_SECONDS - Canary.EVERY:
        return True
    return None


def _reclaim_unheld(
    client: SyncPrefectClient, slots: PrefectSlotApi, names: list[str], dry_run: bool
) -> list[str]:
    """On the embedded default: each limit's slots in use that no live pool here holds or
    asks for, given back by name (see `reclaim`). Counted twice, a moment apart, and the
    smaller surplus taken: a slot taken and given back between the two reads of one count
    (a pipeline of a few milliseconds) is not mistaken for an orphan."""
    api, folder = ledger_api(), ledger_folder()
    lines = []
    for name in sorted({*names, *ledger.holdings(folder, api)}):
        surplus = None
        for look in range(2):
            if look:
                time.sleep(0.2)
            try:
                in_use = client.read_global_concurrency_limit_by_name(name).active_slots
            except ObjectNotFound:
                break
            held = ledger.holdings(folder, api)[name]
            surplus = min(surplus if surplus is not None else in_use, in_use - held)
            if surplus <= 0:
                break
        if not surplus or surplus <= 0:
            continue
        if not dry_run:
            for _ in range(surplus):
                slots.release_unleased([name], held_seconds=0.001)
        verb = "would give back" if dry_run else "gave back"
        lines.append(
            f"{verb} {surplus} slot(s) of {name!r} that no live process holds "
            f"(the server counted {in_use} in use, live runs here hold {held})"
        )
    return lines


def holders(client: SyncPrefectClient, name: str, this_run: UUID | None = None) -> list[str]:
    """Who holds the slots of the limit `name`, one entry per holder: `1 by run NAME (pid P,
    alive)` for a pool with a ledger here (its process alive, dead, or on another host),
    then what no ledger here explains: `by no live process` on the embedded default, else
    `by no run of this host` (another host's, or a crash's)."""
    in_use = int(client.read_global_concurrency_limit_by_name(name).active_slots)
    entries, counted = [], 0
    for found, alive in ledger.ledgers(ledger_folder(), ledger_api()):
        mine = this_run is not None and found.holder == str(this_run)
        if mine:
            found.asking = ()  # this run's own ask in flight is its wait, not a slot it holds
        held = found.slots()[name]
        if not held:
            continue
        counted += held
        pid = found.labels.get(PID_LABEL, "?")
        if alive is None:
            state = f"on {found.labels.get(HOST_LABEL, 'an unknown host')}, not checked from here"
        else:
            state = "alive" if alive else "dead"
        run = "this run" if mine else f"run {_run_name(client, found.holder)}"
        entries.append(f"{held} by {run} (pid {pid}, {state})")
    rest = in_use - counted
    if rest > 0:
        who = "no live process" if on_embedded_default() else "no run of this host"
        entries.append(f"{rest} by {who}")
    return entries


def holders_line(client: SyncPrefectClient, name: str, this_run: UUID | None = None) -> str:
    """`2 of 2 slots of 'site-pipeline' held by run NAME (pid P, alive)`; a holder that is
    gone adds `: run `site-pipeline doctor --fix``."""
    limit = client.read_global_concurrency_limit_by_name(name)
    entries = holders(client, name, this_run)
    if len(entries) == 1:
        held = entries[0].split(" ", 1)[1]  # one holder has them all
        line = f"{int(limit.active_slots)} of {limit.limit} slots of {name!r} held {held}"
    else:
        line = f"{int(limit.active_slots)} of {limit.limit} slots of {name!r} held: " + (
            ", ".join(entries) or "none"
        )
    if any(entry.endswith((", dead)", "no live process")) for entry in entries):
        line += ": run `site-pipeline doctor --fix`"
    return line


def _run_name(client: SyncPrefectClient, holder: str) -> str:
    """The flow run's name, else its id."""
    try:
        return str(client.read_flow_run(UUID(holder)).name)
    except Exception:  # not a flow run this server knows, or no answer: the id says enough
        return holder
