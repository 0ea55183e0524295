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
- Slots go to sites in list order (`flows.slots.hand_out_rule`): with k slots parked, a site's
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
- One upkeep thread renews the leases, so a pipeline may run for hours, and one releaser
  thread gives slots back, so a worker thread never waits on the API.
- A server that restarts with leases in memory forgets them but still counts their slots.
  A lease the server no longer knows, though it confirmed it less than a lease duration
  ago, was lost that way: its slot is given back by name instead. (One that expired was
  already given back by the server.)

The pool's layers, one job a module (as Prefect's `concurrency/` names its own):
`slot_api` (the API it needs, its errors), `pool_state` (what its threads share, under one
lock), `hand_out` (a site takes and gives back), `broker` (the thread that asks the server),
`lease_book` (the leases held, renewed, given back) and `upkeep` (the upkeep and releaser
threads). `SlotPool` here is their public face.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from flows.slots.broker import Broker
from flows.slots.hand_out import HandOut
from flows.slots.lease_book import LeaseBook, LeaseLedger
from flows.slots.pool_state import PoolSettings, PoolState
from flows.slots.slot_api import SlotApi
from flows.slots.upkeep import Upkeep

_DEFAULT_SETTINGS = PoolSettings()  # frozen: one shared default is safe


class SlotPool:
    """Slots of the global concurrency limit `name` for one flow run over `sites`.

    `site_groups` maps a site to its group's limit name, `group_caps` that name to its cap:
    such a site holds a slot of both limits while its pipeline runs, taken in one call."""

    def __init__(
        self,
        name: str,
        sites: Sequence[str],
        api: SlotApi,
        settings: PoolSettings = _DEFAULT_SETTINGS,
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
        self.settings = settings
        self._on_close = on_close
        self._state = state = PoolState(
            name,
            sites,
            api,
            settings,
            LeaseBook(name, api, settings.lease_seconds, ledger),
            prefetch=prefetch,
            park=park,
            site_groups=site_groups or {},
            group_caps=group_caps or {},
        )
        self._hand_out = HandOut(state)
        self._upkeep = Upkeep(state, on_tick, explain_wait)
        self._threads = [
            threading.Thread(target=Broker(state).run, name=f"slots-broker-{name}", daemon=True),
            threading.Thread(target=self._upkeep.tend, name=f"slots-upkeep-{name}", daemon=True),
            threading.Thread(
                target=self._upkeep.release, name=f"slots-release-{name}", daemon=True
            ),
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
        lease = self._hand_out.acquire(site, on_long_wait)
        try:
            yield
        finally:
            self._hand_out.give_back(lease)

    @property
    def waiting_sites(self) -> list[str]:
        """The sites whose thread waits in `slot()` for a slot now, in list order (a copy)."""
        state = self._state
        with state.cond:
            return state.order.waiting_sites

    def add_sites(self, sites: Sequence[str], site_groups: Mapping[str, str]) -> None:
        """Sites this pool was not made with join the end of its list, each of its group's
        limit name in `site_groups` (if any). A Dask worker's pool is made by the first task
        run it gets, which carries only its own site (`SiteJob.for_site`)."""
        state = self._state
        with state.cond:
            for site in sites:
                group = site_groups.get(site)
                if group is not None:
                    state.groups.setdefault(site, group)
                state.order.add(site, state.groups.get(site))

    def stop_waits(self, reason: str) -> None:
        """Every site waiting for a slot, now or later, raises `WaitStopped(reason)`: the
        run stops or halted, and no further site starts."""
        state = self._state
        with state.cond:
            state.waits_stopped = state.waits_stopped or reason
            state.cond.notify_all()

    def site_finished(self, site: str) -> None:
        """`site` reached its final outcome: it will not ask for a slot again."""
        state = self._state
        with state.cond:
            state.order.finished(site)
            state.cond.notify_all()

    def close(self) -> None:
        """Give every lease back to the server and stop the pool's threads."""
        state = self._state
        with state.cond:
            state.closed = True
            state.cond.notify_all()
        self._upkeep.stopped.set()
        broker, upkeep, releaser = self._threads
        broker.join(timeout=10)  # it may still bring one lease; it releases that itself
        upkeep.join(timeout=10)
        with state.cond:
            leases = [lease for lease, _ in state.parked] + list(state.in_use)
            leases += list(state.granted.values())
            state.parked.clear()
            state.in_use.clear()
            state.granted.clear()
        for lease in leases:
            state.releases.put(lease)
        state.releases.put(None)
        releaser.join(timeout=self.settings.api_patience + 5)
        state.book.close()
        if self._on_close is not None:
            self._on_close()
