"""Slots of a global concurrency limit, shared by the threads of one flow run.

Plain Python: the API is passed in (`SlotApi`). `flows.slots.prefect_api` is the Prefect one;
the tests use an in-memory fake. Why not Prefect's automatic tag limit, read from Prefect
3.9's source:

- The task engine takes the tag's slot when a task run starts and keeps it through every
  retry delay, so a site waiting to retry blocks a slot.
- Acquisitions for one set of names go through one serialized queue, which sleeps on the
  server's 423 `Retry-After`, so a freed slot sits idle meanwhile.
- On SQLite a busy database answers 503, and the Prefect client sleeps about 2 s before it
  retries; the serialized queue waits behind that sleep too.

The tuning (`linger`, `poll`, `patience`, `fair_share`, `api_patience`, `warn_every`,
`warn_after`, `lease_seconds`) is one `PoolSettings`. The rules here:

- A slot is taken right before a pipeline process starts and given back when it ends, so a
  site sleeping before its retry holds nothing.
- Worker threads never call the API. A broker thread asks the server while more threads
  wait than slots are parked, and polls every `poll` seconds itself.
- A slot given back while a thread of this run waits goes straight to it, with no API call.
  One nobody waits for is parked for at most `linger` seconds, and only while this run has
  sites left. A lease reused for more than `fair_share` seconds goes back to the server when
  its pipeline ends, and the broker waits a few polls before asking again, so a concurrent
  flow run on the same limit gets its turn.
- Slots go to sites in list order (`flows.slots.order`): with k slots parked, a site's
  first attempt waits until all but k - 1 of the sites before it have started (for at most
  `patience` seconds, so a site that never asks can't block the others). A retry of a
  started site needs no turn in line; of the eligible waiting sites, the earliest in the
  list gets the slot.
- `prefetch` slots are asked for before any thread waits, and kept until a site takes one.
- `park=False` (a process that may end at any moment, like a Dask worker): a slot no thread
  of this process waits for goes back to the server at once, before `slot()` returns, so
  nothing is left to give back when the process ends. That holds for a slot the broker was
  still asking for as the block ended (a waiter took a handed-over one meanwhile): `slot()`
  waits for that ask and gives back what no thread waits for.
- While the API fails (5xx, 401, 403, no connection) for more than `warn_after` seconds
  (SQLite's busy 503s last milliseconds), a warning names the URL and the status every
  `warn_every` seconds; after `api_patience` seconds of failing, every waiting
  site gets `SlotError("could not get a concurrency slot from <url>: <status>")`. Pipelines
  already running are not touched. A failed renewal or release starts that clock too. While
  it runs, a "full" answer (423) only stops it once the server's lease storage answers (a
  renewal of a lease nobody holds: 410): Prefect 3.9 counts a slot whose lease it could not
  store (Redis down) and keeps counting it, so with its lease storage gone a limit looks
  full for good, and waiting sites would otherwise wait forever.
- One keeper thread renews the leases, so a pipeline may run for hours, and one releaser
  thread gives slots back, so a worker thread never waits on the API.
- A server that restarts with leases in memory forgets them but still counts their slots.
  A lease the server no longer knows, though it confirmed it less than a lease duration
  ago, was lost that way: its slot is given back by name instead. (One that expired was
  already given back by the server.)
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from flows.slots.order import HandOutOrder

_JITTER = random.Random()  # noqa: S311  (poll jitter, not security)
"""The broker's own generator: the global `random` state is left alone, which other code
(and hypothesis, which checks that a test's strategies don't touch it) may rely on."""

logger = logging.getLogger("site_pipeline.slots")

LEASE_SECONDS = 60.0  # the server's minimum; renewed every third of it
PROBE_LEASE = UUID(int=0)
"""A lease nobody holds: renewing it asks the server's lease storage, which answers 410."""


class SlotError(RuntimeError):
    """The concurrency limit can't be used: it does not exist, or the API kept failing."""


class WaitStopped(Exception):
    """The run stops (or halted): a site waiting for a slot gives up its wait (`stop_waits`)."""


class ApiUnavailable(Exception):
    """One API call failed in a way that may pass: 5xx, 401, 403, or no connection."""

    def __init__(self, status: str) -> None:
        self.status = status
        super().__init__(status)


class SlotApi(Protocol):
    """What the pool needs from a concurrency-limit API. Each method is one try."""

    @property
    def url(self) -> str:
        """Where the API is, for messages."""
        ...

    def acquire(self, names: Sequence[str], lease_seconds: float) -> UUID | None:
        """One lease on a slot of each of `names`, all or none: None while any is full.

        Raises `ApiUnavailable`, or `SlotError` when a limit does not exist."""
        ...

    def renew(self, lease: UUID, lease_seconds: float) -> bool:
        """Extend a lease; False when the server does not know it. Raises `ApiUnavailable`."""
        ...

    def release(self, lease: UUID) -> None:
        """Give a lease's slots back. Raises `ApiUnavailable`."""
        ...

    def release_unleased(self, names: Sequence[str], held_seconds: float) -> None:
        """Give back one slot of each of `names` without a lease. Raises `ApiUnavailable`,
        or `SlotError` when the server refuses for good."""
        ...


class LeaseLedger(Protocol):
    """Where the pool notes each lease it holds (`flows.slots.ledger`), for crash cleanup."""

    def asking(self, names: Sequence[str]) -> None: ...

    def answered(self) -> None: ...

    def held(self, lease: UUID, names: Sequence[str]) -> None: ...

    def given_back(self, lease: UUID) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PoolSettings:
    """A pool's tuning, in seconds (see the module docstring for what each one does)."""

    linger: float = 1.0  # how long a slot nobody waits for stays parked
    poll: float = 0.05  # how often the broker asks a full server again
    patience: float = 2.0  # how long a first attempt out of line waits for its turn
    fair_share: float = 30.0  # how long a lease is reused before it goes back
    api_patience: float = 300.0  # how long the API may fail before waiting sites fail
    warn_every: float = 30.0  # how often a failing API is warned about
    warn_after: float = 1.0  # how long the API fails before the first warning
    lease_seconds: float = LEASE_SECONDS  # each lease's duration on the server
    group_recheck: float = 1.0  # how long a group the server found full is passed over
    wait_notice: float = 60.0  # how long a site waits before one line says who holds the cap


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


@dataclass
class _Outage:
    """A failing API, as the pool's threads saw it (`since` is set by any of them)."""

    since: float | None = None  # when the API began to fail
    warned_at: float = -float("inf")


@dataclass(frozen=True)
class _Ask:
    """One acquire the broker makes: a global slot (`site` None, parked when granted) or a
    site's pair of its group's slot and a global slot, for that site."""

    names: tuple[str, ...]
    site: str | None = None
    room: UUID | None = None  # a parked global slot to give back first, to make room


class SlotPool:
    """Slots of the global concurrency limit `name` for one flow run over `sites`.

    `site_groups` maps a site to its group's limit name, `group_caps` that name to its cap:
    such a site holds a slot of both limits while its pipeline runs, taken in one call."""

    def __init__(
        self,
        name: str,
        sites: Sequence[str],
        api: SlotApi,
        settings: PoolSettings = PoolSettings(),  # frozen: one shared default is safe
        *,
        prefetch: int = 0,
        park: bool = True,
        on_tick: Callable[[], None] | None = None,
        on_close: Callable[[], None] | None = None,
        ledger: LeaseLedger | None = None,
        site_groups: Mapping[str, str] | None = None,
        group_caps: Mapping[str, int] | None = None,
        explain_wait: Callable[[], str] | None = None,
    ) -> None:
        self.name = name
        self._explain_wait = explain_wait
        self._waiting_since: dict[str, float] = {}  # site -> when its current wait began
        self._noticed: set[str] = set()  # sites whose current wait was explained
        self._notices: dict[str, str] = {}  # site -> the line to log in its own thread
        self._waits_stopped: str | None = None
        self.settings = settings
        self._api = api
        self._groups = {site: group for site, group in (site_groups or {}).items()}
        self._caps = dict(group_caps or {})
        self._order = HandOutOrder(sites, settings.patience, self._groups)
        self._book = LeaseBook(name, api, settings.lease_seconds, ledger)
        self._on_tick = on_tick
        self._on_close = on_close
        self._park = park
        self._cond = threading.Condition()
        self._parked: list[tuple[UUID, float]] = []  # global slots only
        self._in_use: dict[UUID, str | None] = {}  # lease -> its group (None: global only)
        self._granted: dict[str, UUID] = {}  # a group site's pair, until it takes it
        self._asking: set[str] = set()  # group sites the broker is getting a pair for
        self._broker_busy = False  # the broker is asking the server (its asks not yet in)
        self._passed_over: dict[str, float] = {}  # group -> until when (the server refused)
        self._released_at: dict[str, float] = {}  # group -> when this pool last gave one back
        self._group_errors: dict[str, SlotError] = {}
        self._hold_off_until = 0.0  # after a fair-share release, let other runs ask first
        self._prefetch = min(prefetch, sum(site not in self._groups for site in sites))
        self._closed = False
        self._error: SlotError | None = None
        self._stopped = threading.Event()
        self._outage = _Outage()
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
    def slot(self, site: str, on_long_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold one slot for `site` (and one of its group's) for the duration of the block.
        A wait longer than `settings.wait_notice` calls `on_long_wait` once, in this thread,
        with a line saying who holds the cap (`explain_wait`). Raises `SlotError`, or
        `WaitStopped` once `stop_waits` is called."""
        lease = self._acquire(site, on_long_wait)
        try:
            yield
        finally:
            self._give_back(lease)

    @property
    def waiting_sites(self) -> list[str]:
        """The sites whose thread waits in `slot()` for a slot now, in list order (a copy)."""
        with self._cond:
            return self._order.waiting_sites

    def add_sites(self, sites: Sequence[str], site_groups: Mapping[str, str]) -> None:
        """Sites this pool was not made with join the end of its list, each of its group's
        limit name in `site_groups` (if any). A Dask worker's pool is made by the first task
        run it gets, which carries only its own site (`SiteJob.for_site`)."""
        with self._cond:
            for site in sites:
                group = site_groups.get(site)
                if group is not None:
                    self._groups.setdefault(site, group)
                self._order.add(site, self._groups.get(site))

    def stop_waits(self, reason: str) -> None:
        """Every site waiting for a slot, now or later, raises `WaitStopped(reason)`: the
        run stops or halted, and no further site starts."""
        with self._cond:
            self._waits_stopped = self._waits_stopped or reason
            self._cond.notify_all()

    def site_finished(self, site: str) -> None:
        """`site` reached its final outcome: it will not ask for a slot again."""
        with self._cond:
            self._order.finished(site)
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
            leases += list(self._granted.values())
            self._parked.clear()
            self._in_use.clear()
            self._granted.clear()
        for lease in leases:
            self._releases.put(lease)
        self._releases.put(None)
        releaser.join(timeout=self.settings.api_patience + 5)
        self._book.close()
        if self._on_close is not None:
            self._on_close()

    # -- hand-out -------------------------------------------------------------

    def _acquire(self, site: str, on_long_wait: Callable[[str], None] | None = None) -> UUID:
        patience = self.settings.patience
        group = self._groups.get(site)
        with self._cond:
            self._order.wait(site, time.monotonic())
            self._waiting_since[site] = time.monotonic()
            self._cond.notify_all()  # wake the broker
            try:
                while True:
                    if self._waits_stopped is not None:
                        raise WaitStopped(self._waits_stopped)
                    notice = self._notices.pop(site, None)
                    if notice is not None and on_long_wait is not None:
                        self._cond.release()  # the line may be slow to write: not under the lock
                        try:
                            on_long_wait(notice)
                        finally:
                            self._cond.acquire()
                        continue
                    if self._error is not None:
                        raise self._error
                    if group is not None and group in self._group_errors:
                        raise self._group_errors[group]
                    if self._closed:
                        raise SlotError(f"slot pool for {self.name!r} is closed")
                    lease = self._take(site, group)
                    if lease is not None:
                        break
                    # Timed wait: `patience` can make this site eligible with no notify.
                    # (With no patience every waiter is eligible: a hand-over notifies.)
                    self._cond.wait(patience / 4 if patience > 0 else 1.0)
                self._in_use[lease] = group
                self._order.started(site)
                self._cond.notify_all()
                return lease
            finally:
                self._order.stop_waiting(site)
                self._waiting_since.pop(site, None)
                self._noticed.discard(site)
                self._notices.pop(site, None)
                unused = self._granted.pop(site, None)  # granted as it gave up
                if unused is not None:
                    self._releases.put(unused)

    def _take(self, site: str, group: str | None) -> UUID | None:
        """`site`'s lease, if one is there for it now (lock held): its granted pair, or for
        a site outside groups a parked slot, when it is among the first in line."""
        if group is not None:
            return self._granted.pop(site, None)
        if not self._parked or site not in self._line_plan(time.monotonic())[0]:
            return None
        lease, _ = self._parked.pop()
        self._prefetch = 0  # sites ask now: demand is what waits
        return lease

    def _full(self, now: float) -> set[str]:
        """The groups none of whose sites may get a slot now (lock held): at their cap in
        this pool, refused by the server a moment ago, or failed."""
        busy: dict[str, int] = {}
        holders = [*self._in_use.values(), *(self._groups[s] for s in self._granted)]
        for group in holders + [self._groups[s] for s in self._asking]:
            if group is not None:
                busy[group] = busy.get(group, 0) + 1
        full = {g for g, n in busy.items() if g in self._caps and n >= self._caps[g]}
        full |= {g for g, until in self._passed_over.items() if until > now}
        return full | set(self._group_errors)

    def _line_plan(self, now: float) -> tuple[list[str], list[str]]:
        """Who the parked slots are for (lock held): the sites outside groups that may take
        one, and the group sites to get a pair for (the first of them use parked slots).

        Parked slots go to the first sites in line, each one; a group site's is given back
        to make room for its pair. Groups in `_full` are skipped, so their sites hold
        nothing while they wait and hold up nobody."""
        spare = len(self._parked)
        line = self._order.in_line(spare, now, self._full(now))
        takers: list[str] = []
        pairs: list[str] = []
        for site in line:
            if site in self._granted or site in self._asking:
                continue
            group = self._groups.get(site)
            if group is None and spare:
                takers.append(site)
                spare -= 1
            elif group is not None and group not in {self._groups[p] for p in pairs}:
                pairs.append(site)  # one pair per group per round: `_full` counts the rest
                spare -= 1 if spare else 0
        return takers, pairs

    def _give_back(self, lease: UUID) -> None:
        with self._cond:
            group = self._in_use.pop(lease, None)
            acquired_at = self._book.acquired_at(lease)
            fresh = (
                acquired_at is not None
                and time.monotonic() - acquired_at < self.settings.fair_share
            )
            # Keep it (briefly) only while a thread waits or a site of this run may ask,
            # and only for `fair_share` seconds in all: then other flow runs get a turn.
            # A pair is never kept: it goes back, and the broker asks for what is next.
            wanted = self._order.waiting > len(self._parked) or (
                self._park and self._order.unfinished > len(self._in_use)
            )
            if group is None and not self._closed and fresh and wanted:
                self._parked.append((lease, time.monotonic()))
                self._cond.notify_all()
                return
            heir = self._heir(group) if group is not None and fresh else None
            if heir is not None:  # the pair goes straight to the group's next site
                self._granted[heir] = lease
                self._cond.notify_all()
                return
            if not fresh:  # its turn is over: don't race other flow runs for this slot
                self._hold_off_until = time.monotonic() + 4 * self.settings.poll
            self._cond.notify_all()  # a group below its cap again
        if group is not None:
            # A pair goes back now, before its group's next site asks: released later, the
            # server would still count it, refuse that pair, and pass the group over.
            self._release_now(lease)
            with self._cond:
                self._passed_over.pop(group, None)
                self._released_at[group] = time.monotonic()
                self._cond.notify_all()
        elif self._park:
            self._releases.put(lease)
        else:
            self._release_now(lease)
        if not self._park:
            self._give_back_surplus()

    def _give_back_surplus(self) -> None:
        """A pool that doesn't park: the parked slots no waiting site needs go back now,
        before `slot()` returns; the last block of the pool first waits for the broker's
        asks to come in (a slot in use still gives back after, and settles what comes)."""
        with self._cond:
            self._cond.wait_for(
                lambda: not self._broker_busy or self._closed or bool(self._in_use),
                timeout=min(self.settings.api_patience, 30.0),
            )
            surplus = max(0, len(self._parked) - self._demand())
            spare = [lease for lease, _ in self._parked[len(self._parked) - surplus :]]
            del self._parked[len(self._parked) - surplus :]
        for lease in spare:
            self._release_now(lease)

    def _heir(self, group: str) -> str | None:
        """The site of `group` first in line now, to hand a pair of that group straight to
        (lock held): no API call, and no moment in which the server counts both; None when
        none waits, the pool is closing, or the broker is asking for it already."""
        if self._closed:
            return None
        full = self._full(time.monotonic()) - {group}  # this pair is the group's room
        for site in self._order.in_line(0, time.monotonic(), full):
            if self._groups.get(site) == group:
                return None if site in self._granted or site in self._asking else site
        return None

    def _release_now(self, lease: UUID) -> None:
        """Give `lease` back before returning (retrying while the API fails)."""
        deadline = time.monotonic() + self.settings.api_patience
        while True:
            try:
                self._book.give_back(lease)
                return
            except SlotError as exc:
                logger.warning("could not give back slot lease %s: %s", lease, exc)
                return
            except ApiUnavailable as exc:
                self._api_failed()
                if time.monotonic() > deadline:
                    logger.warning(
                        "could not give back slot lease %s of %r to %s: %s",
                        lease,
                        self.name,
                        self._api.url,
                        exc.status,
                    )
                    return
                time.sleep(self.settings.poll)

    def _demand(self) -> int:
        """How many global slots this run wants parked right now (lock held)."""
        outside = sum(site not in self._groups for site in self._order.waiting_sites)
        return max(outside, self._prefetch)

    # -- threads --------------------------------------------------------------

    def _broker(self) -> None:
        """Ask the server for what waits: a global slot whenever more sites outside groups
        wait than slots are parked, and a pair for each group site in line."""
        while (asks := self._wait_for_asks()) is not None:
            try:
                then = self._ask_all(asks)
            finally:
                with self._cond:
                    self._broker_busy = False
                    self._cond.notify_all()
            if then == "stop":
                return
            if then != "go on":
                with self._cond:  # full: wait for the next poll (a hand-over needs none);
                    # failing: ask less often while it fails
                    pause = self.settings.poll * _JITTER.uniform(0.8, 1.2)
                    self._cond.wait(pause if then == "full" else min(1.0, self.settings.poll * 10))

    def _ask_all(self, asks: list[_Ask]) -> str:
        """One round of `asks`: "stop" (the pool closed or failed for good), "full" (some
        refused), "failing" (the API failed) or "go on"."""
        outage = self._outage
        began = time.monotonic()
        granted: list[_Ask] = []
        refused: list[_Ask] = []
        for done, ask in enumerate(asks):
            try:
                lease = self._ask(ask)
                if lease is None and outage.since is not None:
                    self._api.renew(PROBE_LEASE, self.settings.lease_seconds)
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
        if ask.room is not None:
            try:
                self._book.give_back(ask.room)
            except ApiUnavailable:
                with self._cond:
                    self._parked.append((ask.room, time.monotonic()))
                raise
        self._book.asking(ask.names)
        lease = None
        try:
            lease = self._api.acquire(ask.names, self.settings.lease_seconds)
        finally:
            if lease is None:
                self._book.refused()
        return lease

    def _wait_for_asks(self) -> list[_Ask] | None:
        """Wait until something is to be asked for and no hold-off is on; the asks (their
        pair sites marked as being asked for); None once the pool is closed."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                hold_off = self._hold_off_until - now
                asks = self._asks(now) if hold_off <= 0 else []
                if asks:
                    self._broker_busy = True
                    return asks
                waits_for_group = any(s in self._groups for s in self._order.waiting_sites)
                if hold_off > 0:
                    self._cond.wait(hold_off)
                else:  # a group site's turn can come with no notify (patience, a refusal)
                    self._cond.wait(0.25 if waits_for_group else None)
            return None

    def _asks(self, now: float) -> list[_Ask]:
        """What to ask for now, in line order (lock held). A parked slot that a group site
        is first in line for leaves the parked ones now, and goes back to the server just
        before its pair is asked for, to make room."""
        takers, pairs = self._line_plan(now)
        spare = len(self._parked) - len(takers)
        asks = []
        for site in pairs:
            room = None
            if spare > 0:
                spare -= 1
                room = self._parked.pop(0)[0]
                self._prefetch = 0  # sites ask now: demand is what waits
            self._asking.add(site)
            asks.append(_Ask((self.name, self._groups[site]), site, room))
        if self._demand() > len(self._parked):
            asks.append(_Ask((self.name,)))
        return asks

    def _asked(self, asks: list[_Ask], done: int) -> None:
        """The broker is done with `asks`; the room the ones from `done` on would have made
        is parked again."""
        with self._cond:
            self._asking.difference_update(ask.site for ask in asks if ask.site is not None)
            now = time.monotonic()
            self._parked += [(ask.room, now) for ask in asks[done:] if ask.room is not None]
            self._cond.notify_all()

    def _bring(self, ask: _Ask, lease: UUID) -> bool:
        """Note a granted lease: parked, or held for its site; False once the pool closed."""
        with self._cond:
            now = time.monotonic()
            self._book.took(lease, now, ask.names)
            if self._closed:
                self._releases.put(lease)
                return False
            if ask.site is None:
                self._parked.append((lease, now))
            elif ask.site in self._order.waiting_sites:
                self._granted[ask.site] = lease
            else:  # it gave up meanwhile
                self._releases.put(lease)
            self._cond.notify_all()
            return True

    def _note_refusals(self, refused: list[_Ask], granted: list[_Ask], began: float) -> bool:
        """Note the server's refusals of one round (begun at `began`); True when it granted
        nothing and nothing changed meanwhile (wait a poll). A refused pair whose global slot
        had room (one was made for it, or a global slot was granted in the same round) means
        its group is full: the group's sites are passed over for `group_recheck` seconds, so
        the sites behind them get the slots. Unless this pool gave one of the group's slots
        back during the round: the refusal may predate that, so the pair is asked again now."""
        room = any(ask.site is None for ask in granted)
        until = time.monotonic() + self.settings.group_recheck
        again = False
        with self._cond:
            for ask in refused:
                group = ask.names[1] if ask.site is not None else None
                if group is not None and self._released_at.get(group, 0.0) >= began:
                    again = True
                elif group is not None and (ask.room is not None or room):
                    self._passed_over[group] = until
            self._cond.notify_all()
        return not granted and not again

    def _refuse_for_good(self, ask: _Ask, error: SlotError) -> None:
        """A limit is missing: the global one fails every waiting site, a group's only the
        group's sites."""
        with self._cond:
            self._asking.discard(ask.site or "")
            if ask.site is None:
                self._error = error
            else:
                self._group_errors[ask.names[1]] = error
            self._cond.notify_all()

    def _gave_up(self, outage: _Outage, exc: ApiUnavailable) -> bool:
        """Note a failed acquire: warn now and then; after `api_patience` seconds of
        failing, fail every waiting site (True)."""
        settings = self.settings
        now = time.monotonic()
        outage.since = now if outage.since is None else outage.since
        failing_for = now - outage.since
        if failing_for >= settings.warn_after and now - outage.warned_at >= settings.warn_every:
            outage.warned_at = now
            logger.warning(
                "could not get a concurrency slot of %r from %s: %s; retrying, "
                "waiting sites give up after %gs",
                self.name,
                self._api.url,
                exc.status,
                settings.api_patience,
            )
        if failing_for < settings.api_patience:
            return False
        self._fail(
            SlotError(f"could not get a concurrency slot from {self._api.url}: {exc.status}")
        )
        return True

    def _api_failed(self) -> None:
        """A renewal or a release failed: the outage clock runs from now, unless it runs."""
        with self._cond:
            if self._outage.since is None:
                self._outage.since = time.monotonic()

    def _fail(self, error: SlotError) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def _explain_long_waits(self) -> None:
        """The sites waiting longer than `wait_notice` get a line saying who holds the cap,
        once per wait (`explain_wait`, asked here: not in a site's thread, nor under the lock)."""
        if self._explain_wait is None:
            return
        with self._cond:
            now = time.monotonic()
            due = [
                site
                for site, since in self._waiting_since.items()
                if now - since >= self.settings.wait_notice and site not in self._noticed
            ]
        if not due:
            return
        try:
            line = self._explain_wait()
        except Exception as exc:  # the API failed: say so, the wait goes on
            line = f"who holds the slots of {self.name!r} can't be told: {exc}"
        with self._cond:
            for site in due:
                if site in self._waiting_since:
                    waited = time.monotonic() - self._waiting_since[site]
                    self._notices[site] = f"waiting {waited:.0f}s for a slot: {line}"
                    self._noticed.add(site)
            self._cond.notify_all()

    def _releaser(self) -> None:
        """Give queued leases back until `None` arrives, retrying while the API fails."""
        while (lease := self._releases.get()) is not None:
            self._release_now(lease)

    def _keeper(self) -> None:
        """Return slots parked longer than `linger` seconds, and renew held leases."""
        linger, lease_seconds = self.settings.linger, self.settings.lease_seconds
        next_renewal = time.monotonic() + lease_seconds / 3
        while not self._stopped.wait(min(linger / 2, 0.25)):
            if self._on_tick is not None:
                self._on_tick()
            with self._cond:
                now = time.monotonic()
                surplus = len(self._parked) - self._demand()
                stale = [lease for lease, since in self._parked if now - since >= linger]
                stale = stale[: max(0, surplus)]
                self._parked = [(lease, s) for lease, s in self._parked if lease not in stale]
                renew = (
                    [lease for lease, _ in self._parked] + [*self._in_use, *self._granted.values()]
                    if now >= next_renewal
                    else []
                )
            for lease in stale:
                self._releases.put(lease)
            self._explain_long_waits()
            if renew:
                next_renewal = now + lease_seconds / 3
                if not self._book.renew(renew):
                    self._api_failed()
