"""The slot pool's rules, against an in-memory fake API: no server, no Prefect."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import pytest

from flows.slots import PoolSettings, SlotError, SlotPool
from tests.support.fakes.slot_api import FakeLimit, FakeSlotApi
from tests.support.waiting import wait_for, wait_until


@contextmanager
def pool_on(
    limit: FakeLimit, sites: Sequence[str], settings: PoolSettings | None = None, **hooks: Any
) -> Iterator[SlotPool]:
    """A pool on `limit` (default settings unless given), closed after the block."""
    pool = SlotPool("cap", sites, FakeSlotApi(limit), settings or PoolSettings(), **hooks)
    try:
        yield pool
    finally:
        pool.close()


def run_site(
    pool: SlotPool,
    site: str,
    order: list[str],
    hold: float | threading.Event,
    finish: bool = True,
) -> threading.Thread:
    """A thread body: take a slot for `site`, note the order, hold it (`hold` seconds, or
    until the event `hold` is set), give it back."""

    def body() -> None:
        with pool.slot(site):
            order.append(site)
            if isinstance(hold, threading.Event):
                hold.wait(30)
            else:
                time.sleep(hold)
        if finish:
            pool.site_finished(site)

    return threading.Thread(target=body)


def slot_errors_of(pool: SlotPool, site: str) -> tuple[list[str], float]:
    """Wait (up to 10 s, in a thread) for `site`'s slot: the SlotErrors it got, and how
    long the wait took."""
    errors: list[str] = []

    def wait() -> None:
        try:
            with pool.slot(site):
                pass
        except SlotError as exc:
            errors.append(str(exc))

    started = time.monotonic()
    thread = threading.Thread(target=wait)
    thread.start()
    thread.join(10)
    return errors, time.monotonic() - started


def until_waiting(pool: SlotPool, *sites: str) -> None:
    """Return once each of `sites` waits in `pool` for a slot (AssertionError after 30 s)."""
    wait_until(
        lambda: set(sites) <= set(pool.waiting_sites),
        f"{', '.join(sites)} waiting for a slot",
        timeout=30,
    )


def test_slots_go_to_sites_in_list_order() -> None:
    """With one slot, sites that ask in reverse order still start in list order."""
    sites = ["a", "b", "c", "d"]
    order: list[str] = []
    with pool_on(FakeLimit(1), sites, PoolSettings(patience=10)) as pool:
        threads = [run_site(pool, site, order, hold=0.05) for site in reversed(sites)]
        for site, thread in zip(reversed(sites), threads, strict=True):
            thread.start()
            if site != sites[0]:  # 'a' starts, so the others go, once they all wait
                until_waiting(pool, site)
        for thread in threads:
            thread.join(10)
    assert order == sites


def test_a_retry_of_a_started_site_goes_before_a_later_first_attempt() -> None:
    """A started site's retry needs no turn in line; a first attempt out of order waits."""
    order: list[str] = []
    # 'a' never asks, so 'b' and 'c' are out of line until `patience` (1 s) passes.
    with pool_on(FakeLimit(1), ["a", "b", "c"], PoolSettings(patience=1.0)) as pool:
        first = run_site(pool, "c", order, hold=0.0, finish=False)
        first.start()
        first.join(10)  # c started after 1 s of patience; its retry is due
        b = run_site(pool, "b", order, hold=0.0)
        b.start()
        until_waiting(pool, "b")  # out of line: for its patience to run out
        retry = run_site(pool, "c", order, hold=0.0)
        retry.start()
        for thread in (b, retry):
            thread.join(10)
    assert order == ["c", "c", "b"]


def test_a_retry_goes_before_the_next_first_attempt() -> None:
    """One slot; 'a' failed its first attempt and waits to retry while 'c' waits for its first:
    when 'b' gives the slot back, 'a' (earlier in the list, already started) gets it."""
    order: list[str] = []
    with pool_on(FakeLimit(1), ["a", "b", "c"], PoolSettings(patience=10)) as pool:
        first = run_site(pool, "a", order, hold=0.0, finish=False)
        first.start()
        first.join(5)
        let_go = threading.Event()
        b = run_site(pool, "b", order, hold=let_go)
        b.start()
        wait_until(lambda: "b" in order, "b holding the slot")
        c = run_site(pool, "c", order, hold=0.0)
        c.start()
        until_waiting(pool, "c")
        retry = run_site(pool, "a", order, hold=0.0)
        retry.start()
        until_waiting(pool, "a", "c")
        let_go.set()  # b gives the slot back while both wait
        for thread in (b, c, retry):
            thread.join(10)
    assert order == ["a", "b", "a", "c"]


def test_after_a_fair_share_release_the_pool_lets_others_ask_first() -> None:
    """A slot given back for fair share is not asked for again by the same pool at once:
    its next acquire comes at least a few polls (4 x 0.05 s) after the release, though a
    site of the pool waits."""
    limit = FakeLimit(1)
    with pool_on(limit, ["a", "b"], PoolSettings(fair_share=0.0, poll=0.05)) as pool:
        waiter = run_site(pool, "b", [], hold=0.0)
        with pool.slot("a"):
            waiter.start()
            until_waiting(pool, "b")  # so the pool would ask again at once, but for the rule
            given_back = time.monotonic()  # just before the block ends
        pool.site_finished("a")
        waiter.join(5)
    released = next(t for call, t in limit.times if call == "release")
    asked = [t for call, t in limit.times if call == "acquire" and t > released]
    assert asked and min(asked) - given_back >= 0.19, (given_back, released, asked)


def test_prefetch_asks_for_slots_before_any_site_waits() -> None:
    """prefetch=3 holds 3 slots of the server's before any thread asks; prefetch=0 holds none."""
    limit = FakeLimit(5)
    poll = PoolSettings().poll
    with pool_on(limit, ["a", "b", "c", "d"], prefetch=3):
        assert wait_for(lambda: limit.active == 3)
        # No more than asked for: an observation window, not a wait for an event. A broker
        # that wanted more would ask at once (and again every poll); 4 polls pass with no
        # 4th acquire (a 4th fails the test the moment it happens).
        assert not wait_for(lambda: limit.calls.count("acquire") > 3, timeout=4 * poll)
        assert limit.active == 3
    assert limit.active == 0
    idle = FakeLimit(5)
    with pool_on(idle, ["a", "b"], prefetch=0):
        # Likewise: over 6 polls the broker never asks.
        assert not wait_for(lambda: "acquire" in idle.calls, timeout=6 * poll)
        assert idle.active == 0


def test_an_unused_slot_lingers_then_goes_back_to_the_server() -> None:
    """A slot given back while sites remain is parked (no API call), then returned after
    `linger` seconds when nobody asked for it."""
    limit = FakeLimit(2)
    with pool_on(limit, ["a", "b"], PoolSettings(linger=0.5)) as pool:
        with pool.slot("a"):
            assert limit.active == 1
            given_back = time.monotonic()  # just before the block ends
        assert wait_for(lambda: limit.active == 0, timeout=10)  # returned, in the end
    released = next(t for call, t in limit.times if call == "release")
    assert released - given_back >= 0.5  # parked, not released, for `linger` first


def test_without_parking_a_slot_is_back_on_the_server_when_the_block_ends() -> None:
    """park=False (a Dask worker): with no local waiter, the slot is released before
    `slot()` returns, though sites of the run remain; nothing is left for a killed process."""
    limit = FakeLimit(2)
    with pool_on(limit, ["a", "b", "c"], park=False) as pool:
        with pool.slot("a"):
            assert limit.active == 1
        assert limit.active == 0 and limit.calls[-1] == "release"


def test_without_parking_a_slot_the_broker_brings_late_is_back_before_the_block_ends() -> None:
    """park=False: 'b' waits, the broker asks the server for it, and 'a' hands 'b' its slot
    before that ask answers. The slot the broker then brings nobody needs: it is back on the
    server before b's `slot()` returns (a Dask worker may be stopped right after)."""
    limit = FakeLimit(3)
    answer = threading.Event()

    asks: list[float] = []

    class SlowApi(FakeSlotApi):
        def acquire(self, names: Sequence[str], lease_seconds: float) -> UUID | None:
            asks.append(time.monotonic())
            if len(asks) > 1:  # the ask for 'b' is answered when the test says so
                answer.wait(30)
            return super().acquire(names, lease_seconds)

    pool = SlotPool("cap", ["a", "b"], SlowApi(limit), PoolSettings(linger=60), park=False)
    try:
        let_go = threading.Event()
        b = run_site(pool, "b", [], hold=let_go)
        with pool.slot("a"):
            b.start()
            until_waiting(pool, "b")
            wait_until(lambda: len(asks) == 2, "the broker asking for b")
        wait_until(lambda: "b" not in pool.waiting_sites, "b taking the slot a handed over")
        answer.set()
        wait_until(lambda: limit.active == 2, "the late slot counted on the server")
        let_go.set()
        b.join(10)
        assert not b.is_alive()
        assert limit.active == 0, limit.calls  # not after `linger` (60 s): at once
    finally:
        answer.set()
        pool.close()


def test_a_parked_slot_is_handed_over_without_asking_the_server() -> None:
    """The next site takes the parked slot: one acquire served two sites."""
    limit = FakeLimit(1)
    with pool_on(limit, ["a", "b"], PoolSettings(linger=5)) as pool:
        with pool.slot("a"):
            pass
        pool.site_finished("a")
        with pool.slot("b"):
            pass
    assert limit.calls.count("acquire") == 1


def test_fair_share_gives_a_second_pool_a_turn() -> None:
    """Two pools on one slot: after `fair_share` seconds of reuse, the busy pool gives the slot
    back to the server, so the other pool's site starts long before the busy one is done."""
    limit = FakeLimit(1)
    busy_sites = [f"a{i}" for i in range(30)]
    order: list[str] = []
    with (
        pool_on(limit, busy_sites, PoolSettings(fair_share=0.3)) as busy,
        pool_on(limit, ["b"], PoolSettings(fair_share=0.3)) as other,
    ):

        def busy_body() -> None:
            for site in busy_sites:
                with busy.slot(site):
                    order.append(site)
                    time.sleep(0.05)
                busy.site_finished(site)

        worker = threading.Thread(target=busy_body)
        worker.start()
        wait_until(lambda: order, "the busy pool's first site holding the slot")
        waiter = run_site(other, "b", order, hold=0.05)
        waiter.start()
        for thread in (worker, waiter):
            thread.join(20)
    assert limit.peak == 1
    assert order.index("b") < len(busy_sites) // 2, order


def test_a_slot_is_given_back_when_the_block_raises() -> None:
    """A site whose pipeline code raises still gives its slot back; the next site gets it."""
    limit = FakeLimit(1)
    with pool_on(limit, ["a", "b"]) as pool:
        with pytest.raises(RuntimeError), pool.slot("a"):
            raise RuntimeError("boom")
        pool.site_finished("a")
        got = threading.Event()

        def take_b() -> None:
            with pool.slot("b"):
                got.set()

        thread = threading.Thread(target=take_b)
        thread.start()
        thread.join(5)
        assert got.is_set()
    assert limit.active == 0


def test_a_failing_api_warns_then_fails_waiting_sites_after_api_patience(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the API answers 503, a warning names the URL and status every `warn_every` s;
    after `api_patience` s the waiting site gets SlotError; a running site is not touched."""
    limit = FakeLimit(2)
    api = FakeSlotApi(limit)
    pool = SlotPool(
        "cap", ["a", "b"], api, PoolSettings(api_patience=1.0, warn_every=0.4, warn_after=0)
    )
    running_done = threading.Event()
    try:
        with caplog.at_level(logging.WARNING, logger="site_pipeline.slots"), pool.slot("a"):
            api.down = "HTTP 503 Service Unavailable"
            errors, waited = slot_errors_of(pool, "b")
            running_done.set()  # 'a' kept its slot all along
    finally:
        api.down = None
        pool.close()
    assert errors == [
        "could not get a concurrency slot from http://fake.invalid/api: "
        "HTTP 503 Service Unavailable"
    ]
    assert 0.9 <= waited < 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    about_slots = [w for w in warnings if "could not get a concurrency slot" in w]
    assert 2 <= len(about_slots) <= 4, about_slots  # every 0.4 s over 1 s, not every poll
    assert all("http://fake.invalid/api" in w and "HTTP 503" in w for w in about_slots)
    assert running_done.is_set()
    assert limit.active == 0  # a's slot went back once the API answered again


def test_a_short_failure_heals_without_failing_anyone_or_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An API that fails for less than `warn_after` seconds (SQLite busy) only delays the
    waiting site: no error, no warning."""
    limit = FakeLimit(1)
    api = FakeSlotApi(limit)
    pool = SlotPool("cap", ["a"], api, PoolSettings(api_patience=5, warn_after=2))
    api.down = "HTTP 503 Service Unavailable"
    threading.Timer(0.5, lambda: setattr(api, "down", None)).start()
    try:
        with caplog.at_level(logging.WARNING, logger="site_pipeline.slots"), pool.slot("a"):
            pass
    finally:
        pool.close()
    assert limit.active == 0
    assert "acquire" in limit.calls[1:]  # it did fail at first, and asked again
    assert not [r for r in caplog.records if "could not get a concurrency slot" in r.getMessage()]


def test_a_limit_that_looks_full_because_its_lease_storage_is_down_fails_waiting_sites() -> None:
    """Prefect 3.9 with Redis lease storage, Redis gone: the acquire counts a slot it could
    not lease (500), so the limit then answers 423 for good. A 423 during an outage stops
    the outage clock only once the lease storage answers, so the waiting site fails after
    `api_patience` instead of waiting forever; the running site is not touched."""
    limit = FakeLimit(2)
    api = FakeSlotApi(limit)
    pool = SlotPool("cap", ["a", "b"], api, PoolSettings(api_patience=1.0, warn_after=0))
    try:
        with pool.slot("a"):
            api.lease_store_down = "HTTP 500 Internal Server Error"
            errors, waited = slot_errors_of(pool, "b")
            a_still_held = limit.active >= 1
            calls_while_held = list(limit.calls)  # before a's give-back renews its lease
            api.lease_store_down = None
    finally:
        api.lease_store_down = None
        pool.close()
    assert errors == [
        "could not get a concurrency slot from http://fake.invalid/api: "
        "HTTP 500 Internal Server Error"
    ]
    assert 0.9 <= waited < 5
    assert a_still_held
    assert "renew" in calls_while_held  # the probe that told the outage from a full limit


def test_a_limit_really_full_after_a_short_outage_is_waited_for_past_api_patience() -> None:
    """An API that failed for a moment, then answers 423 because another run holds the only
    slot for longer than `api_patience`: its lease storage answers, so that is a full limit,
    not an outage, and the waiting site gets the slot once the other run gives it back."""
    limit = FakeLimit(1)
    other = SlotPool("cap", ["x"], FakeSlotApi(limit), PoolSettings())
    api = FakeSlotApi(limit)
    api_patience = 0.5
    pool = SlotPool("cap", ["a"], api, PoolSettings(api_patience=api_patience, warn_after=0))
    got_at: list[float] = []
    try:
        with other.slot("x"):
            api.down = "HTTP 503 Service Unavailable"
            asked_before = limit.calls.count("acquire")

            def wait_a() -> None:
                with pool.slot("a"):
                    got_at.append(time.monotonic())

            thread = threading.Thread(target=wait_a)
            thread.start()
            wait_until(
                lambda: limit.calls.count("acquire") > asked_before,
                "the pool of 'a' asking the failing API",
            )
            api.down = None  # the outage was short: one failed acquire
            # The rule's time, not a wait for an event: for 4 x api_patience, the limit full
            # all along, 'a' neither gets a slot nor gives up (either ends its thread, which
            # fails the test at once).
            assert not wait_for(lambda: not thread.is_alive(), timeout=4 * api_patience)
            released_at = time.monotonic()
        other.site_finished("x")
        other.close()
        wait_until(lambda: got_at, "'a' getting the slot the other run gave back")
        thread.join(10)
    finally:
        pool.close()
        other.close()
    assert len(got_at) == 1 and got_at[0] >= released_at
    assert limit.active == 0


def test_a_lease_lost_in_a_server_restart_is_given_back_by_name() -> None:
    """The server forgot the lease but still counts its slot: the pool releases it by name."""
    limit = FakeLimit(1)
    with pool_on(limit, ["a"]) as pool:
        with pool.slot("a"):
            limit.forget_leases()
        pool.site_finished("a")
    assert "release_unleased" in limit.calls
    assert limit.active == 0


def test_an_expired_lease_is_not_given_back_twice() -> None:
    """A lease the server already expired (not renewed for a lease duration) is not released
    by name again, which would free a slot someone else holds."""
    limit = FakeLimit(2)
    api = FakeSlotApi(limit)
    pool = SlotPool("cap", ["a"], api, PoolSettings(lease_seconds=0.3))
    try:
        with pool.slot("a"):
            api.renew_down = True  # the upkeep thread can't renew it
            (lease,) = list(limit.leases)
            limit.expire(lease)  # so the server expires it
            # The rule's time, not a wait for an event: the book tells an expired lease
            # from one a restart lost by the time since the server last confirmed it (more
            # than a lease duration, 0.3 s, here), on the real clock.
            time.sleep(0.5)
            api.renew_down = False
        pool.site_finished("a")
    finally:
        pool.close()
    assert "release_unleased" not in limit.calls
    assert limit.active == 0


def test_waiting_sites_do_not_spin_when_patience_is_zero() -> None:
    """patience=0 (a Dask worker's pool): 4 sites waiting a second for a slot cost little CPU,
    not a busy loop."""
    limit = FakeLimit(1)
    with pool_on(limit, ["a", "b", "c", "d", "e"], PoolSettings(patience=0), park=False) as pool:
        order: list[str] = []
        with pool.slot("a"):
            waiters = [run_site(pool, site, order, hold=0.0) for site in "bcde"]
            for thread in waiters:
                thread.start()
            until_waiting(pool, "b", "c", "d", "e")
            cpu = time.process_time()
            time.sleep(1.0)  # the span measured, not a wait for an event
            spent = time.process_time() - cpu
        for thread in waiters:
            thread.join(5)
    assert sorted(order) == ["b", "c", "d", "e"]
    assert spent < 0.3, f"{spent:.2f} s of CPU while waiting"
