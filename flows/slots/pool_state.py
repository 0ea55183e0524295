"""What one slot pool's threads share, under one lock, and the questions they all ask of it.

Plain Python. The hand-out (`flows.slots.hand_out`), the broker (`flows.slots.broker`) and
the upkeep and releaser threads (`flows.slots.upkeep`) of one `SlotPool` read and change one
`PoolState` while holding its `cond`: the slots parked, granted and in use, the groups the
server refused, the API's outage. The methods marked "lock held" are called with `cond` held.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from uuid import UUID

from flows.slots.hand_out_rule import HandOutRule
from flows.slots.lease_book import LeaseBook
from flows.slots.slot_api import LEASE_SECONDS, ApiUnavailable, SlotApi, SlotError

logger = logging.getLogger("site_pipeline.slots")


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
class Outage:
    """A failing API, as the pool's threads saw it (`since` is set by any of them)."""

    since: float | None = None  # when the API began to fail
    warned_at: float = -float("inf")


class PoolState:
    """One pool's shared state: what it holds, who waits, and what the server said."""

    def __init__(
        self,
        name: str,
        sites: Sequence[str],
        api: SlotApi,
        settings: PoolSettings,
        book: LeaseBook,
        *,
        prefetch: int,
        park: bool,
        site_groups: Mapping[str, str],
        group_caps: Mapping[str, int],
    ) -> None:
        self.name = name
        self.settings = settings
        self.api = api
        self.book = book
        self.park = park
        self.groups = dict(site_groups)  # site -> its group's limit name
        self.caps = dict(group_caps)  # a group's limit name -> its cap
        self.order = HandOutRule(sites, settings.patience, self.groups)
        self.cond = threading.Condition()
        self.parked: list[tuple[UUID, float]] = []  # global slots only
        self.in_use: dict[UUID, str | None] = {}  # lease -> its group (None: global only)
        self.granted: dict[str, UUID] = {}  # a group site's pair, until it takes it
        self.asking: set[str] = set()  # group sites the broker is getting a pair for
        self.broker_busy = False  # the broker is asking the server (its asks not yet in)
        self.passed_over: dict[str, float] = {}  # group -> until when (the server refused)
        self.released_at: dict[str, float] = {}  # group -> when this pool last gave one back
        self.group_errors: dict[str, SlotError] = {}
        self.hold_off_until = 0.0  # after a fair-share release, let other runs ask first
        self.prefetch = min(prefetch, sum(site not in self.groups for site in sites))
        self.closed = False
        self.error: SlotError | None = None
        self.waits_stopped: str | None = None
        self.outage = Outage()
        self.releases: queue.SimpleQueue[UUID | None] = queue.SimpleQueue()
        self.waiting_since: dict[str, float] = {}  # site -> when its current wait began
        self.noticed: set[str] = set()  # sites whose current wait was explained
        self.notices: dict[str, str] = {}  # site -> the line to log in its own thread

    def full(self, now: float) -> set[str]:
        """The groups none of whose sites may get a slot now (lock held): at their cap in
        this pool, refused by the server a moment ago, or failed."""
        busy: dict[str, int] = {}
        holders = [*self.in_use.values(), *(self.groups[s] for s in self.granted)]
        for group in holders + [self.groups[s] for s in self.asking]:
            if group is not None:
                busy[group] = busy.get(group, 0) + 1
        full = {g for g, n in busy.items() if g in self.caps and n >= self.caps[g]}
        full |= {g for g, until in self.passed_over.items() if until > now}
        return full | set(self.group_errors)

    def line_plan(self, now: float) -> tuple[list[str], list[str]]:
        """Who the parked slots are for (lock held): the sites outside groups that may take
        one, and the group sites to get a pair for (the first of them use parked slots).

        Parked slots go to the first sites in line, each one; a group site's is given back
        to make room for its pair. Groups in `full` are skipped, so their sites hold
        nothing while they wait and hold up nobody."""
        spare = len(self.parked)
        line = self.order.in_line(spare, now, self.full(now))
        takers: list[str] = []
        pairs: list[str] = []
        for site in line:
            if site in self.granted or site in self.asking:
                continue
            group = self.groups.get(site)
            if group is None and spare:
                takers.append(site)
                spare -= 1
            elif group is not None and group not in {self.groups[p] for p in pairs}:
                pairs.append(site)  # one pair per group per round: `full` counts the rest
                spare -= 1 if spare else 0
        return takers, pairs

    def heir(self, group: str) -> str | None:
        """The site of `group` first in line now, to hand a pair of that group straight to
        (lock held): no API call, and no moment in which the server counts both; None when
        none waits, the pool is closing, or the broker is asking for it already."""
        if self.closed:
            return None
        full = self.full(time.monotonic()) - {group}  # this pair is the group's room
        for site in self.order.in_line(0, time.monotonic(), full):
            if self.groups.get(site) == group:
                return None if site in self.granted or site in self.asking else site
        return None

    def release_now(self, lease: UUID) -> None:
        """Give `lease` back before returning (retrying while the API fails)."""
        deadline = time.monotonic() + self.settings.api_patience
        while True:
            try:
                self.book.give_back(lease)
                return
            except SlotError as exc:
                logger.warning("could not give back slot lease %s: %s", lease, exc)
                return
            except ApiUnavailable as exc:
                self.api_failed()
                if time.monotonic() > deadline:
                    logger.warning(
                        "could not give back slot lease %s of %r to %s: %s",
                        lease,
                        self.name,
                        self.api.url,
                        exc.status,
                    )
                    return
                time.sleep(self.settings.poll)

    def demand(self) -> int:
        """How many global slots this run wants parked right now (lock held)."""
        outside = sum(site not in self.groups for site in self.order.waiting_sites)
        return max(outside, self.prefetch)

    def api_failed(self) -> None:
        """A renewal or a release failed: the outage clock runs from now, unless it runs."""
        with self.cond:
            if self.outage.since is None:
                self.outage.since = time.monotonic()

    def fail(self, error: SlotError) -> None:
        """Every waiting site (and every later one) raises `error`."""
        with self.cond:
            self.error = error
            self.cond.notify_all()
