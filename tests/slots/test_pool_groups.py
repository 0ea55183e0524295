"""Group caps in the slot pool, on the in-memory fake API: a group site takes its group's
slot and a global slot in one call, and never holds up the sites behind it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from uuid import UUID

import pytest

from flows.slots import PoolSettings, SlotError, SlotPool
from tests.support.fakes.slot_api import FakeLimit, FakeSlotApi
from tests.support.waiting import wait_for

GROUP = "cap:host"


@contextmanager
def group_pool(
    limit: FakeLimit,
    group: FakeLimit,
    sites: Sequence[str],
    members: Sequence[str],
    prefetch: int = 0,
    api: FakeSlotApi | None = None,
    group_recheck: float = 1.0,
) -> Iterator[SlotPool]:
    """A pool on `limit` whose `members` are in the group limit `group` (cap = its limit)."""
    pool = SlotPool(
        "cap",
        sites,
        api or FakeSlotApi(limit, {GROUP: group}),
        PoolSettings(patience=10, group_recheck=group_recheck),
        prefetch=prefetch,
        site_groups={site: GROUP for site in members},
        group_caps={GROUP: group.limit},
    )
    try:
        yield pool
    finally:
        pool.close()


class Timeline:
    """When each site ran, and how many ran at once (all, and of the group)."""

    def __init__(self, members: Sequence[str]) -> None:
        self.members = set(members)
        self.spans: dict[str, tuple[float, float]] = {}
        self.running: set[str] = set()
        self.peak = self.group_peak = 0
        self.lock = threading.Lock()

    def thread(self, pool: SlotPool, site: str, hold: float) -> threading.Thread:
        def body() -> None:
            with pool.slot(site):
                with self.lock:
                    start = time.monotonic()
                    self.running.add(site)
                    self.peak = max(self.peak, len(self.running))
                    in_group = len(self.running & self.members)
                    self.group_peak = max(self.group_peak, in_group)
                time.sleep(hold)
                with self.lock:
                    self.running.discard(site)
                    self.spans[site] = (start, time.monotonic())
            pool.site_finished(site)

        return threading.Thread(target=body)


def test_sites_outside_the_group_use_the_second_slot_while_group_sites_take_turns() -> None:
    """Group cap 1, four group sites listed first, global cap 2 (prefetched, as the flow
    does): never more than 1 group site and 2 sites at once, the group sites run in list
    order, and the other sites all start and finish before the group sites are done."""
    group_sites = ["g1", "g2", "g3", "g4"]
    others = ["o1", "o2", "o3", "o4"]
    limit, group = FakeLimit(2), FakeLimit(1)
    timeline = Timeline(group_sites)
    with group_pool(limit, group, group_sites + others, group_sites, prefetch=2) as pool:
        threads = [timeline.thread(pool, s, 0.3) for s in group_sites]
        threads += [timeline.thread(pool, s, 0.1) for s in others]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    spans = timeline.spans
    assert set(spans) == set(group_sites + others)
    assert timeline.peak <= 2 and timeline.group_peak == 1
    assert limit.peak <= 2 and group.peak == 1
    assert sorted(group_sites, key=lambda s: spans[s][0]) == group_sites
    last_group_end = max(spans[s][1] for s in group_sites)
    assert max(spans[s][1] for s in others) < last_group_end, spans
    assert min(spans[s][0] for s in others) < spans["g1"][1] + 0.05, spans
    assert limit.active == 0 and group.active == 0


def test_a_group_site_waiting_for_its_group_holds_no_global_slot() -> None:
    """While g1 runs (group cap 1), g2 waits for the group and holds nothing: the server
    counts one global slot (g1's) and one group slot; every group acquire named both."""
    limit, group = FakeLimit(2), FakeLimit(1)
    api = FakeSlotApi(limit, {GROUP: group})
    with group_pool(limit, group, ["g1", "g2"], ["g1", "g2"], api=api) as pool:
        timeline = Timeline(["g1", "g2"])
        with pool.slot("g1"):
            waiter = timeline.thread(pool, "g2", 0.0)
            waiter.start()
            time.sleep(0.4)
            assert "g2" not in timeline.spans
            assert limit.active == 1 and group.active == 1
        pool.site_finished("g1")
        waiter.join(5)
        assert "g2" in timeline.spans
    assert set(api.asked) == {("cap", GROUP)}
    assert limit.active == 0 and group.active == 0


def test_a_group_full_in_another_run_does_not_hold_up_the_sites_behind() -> None:
    """Another flow run holds the group's only slot: this run's group site, first in line,
    waits, and the site behind it gets the global slot at once (not after `patience`)."""
    limit, group = FakeLimit(2), FakeLimit(1)
    elsewhere = FakeSlotApi(limit, {GROUP: group}).acquire(["cap", GROUP], 60)
    assert elsewhere is not None
    timeline = Timeline(["g1"])
    with group_pool(limit, group, ["g1", "o1"], ["g1"], prefetch=1) as pool:
        started = time.monotonic()
        threads = [timeline.thread(pool, s, 0.0) for s in ("g1", "o1")]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: "o1" in timeline.spans, timeout=5)
        assert timeline.spans["o1"][0] - started < 2.0  # patience is 10 s
        assert "g1" not in timeline.spans and group.active == 1
        FakeSlotApi(limit, {GROUP: group}).release(elsewhere)
        for thread in threads:
            thread.join(10)
    assert "g1" in timeline.spans
    assert limit.active == 0 and group.active == 0


def test_the_group_cap_holds_across_two_pools_on_one_server() -> None:
    """Two flow runs (two pools) with group sites on one server, group cap 1, global cap 4:
    never more than one group site at once in all, and every site runs."""
    limit, group = FakeLimit(4), FakeLimit(1)
    running: set[str] = set()
    peak = 0
    lock = threading.Lock()
    with (
        group_pool(limit, group, ["a1", "a2", "a3"], ["a1", "a2", "a3"]) as first,
        group_pool(limit, group, ["b1", "b2", "b3"], ["b1", "b2", "b3"]) as second,
    ):

        def body(pool: SlotPool, site: str) -> None:
            nonlocal peak
            with pool.slot(site):
                with lock:
                    running.add(site)
                    peak = max(peak, len(running))
                time.sleep(0.1)
                with lock:
                    running.discard(site)
            pool.site_finished(site)

        threads = [threading.Thread(target=body, args=(first, f"a{i}")) for i in (1, 2, 3)]
        threads += [threading.Thread(target=body, args=(second, f"b{i}")) for i in (1, 2, 3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    assert peak == 1 and group.peak == 1
    assert not running and limit.active == 0 and group.active == 0


def test_a_retry_of_a_group_site_takes_a_pair_again_and_gives_it_back() -> None:
    """A group site's second attempt takes its pair again; between attempts it holds
    nothing, and a pair is never parked."""
    limit, group = FakeLimit(2), FakeLimit(1)
    with group_pool(limit, group, ["g1", "o1"], ["g1"]) as pool:
        with pool.slot("g1"):
            assert limit.active == 1 and group.active == 1
        assert wait_for(lambda: limit.active == 0 and group.active == 0)
        with pool.slot("g1"):
            assert group.active == 1
        pool.site_finished("g1")
    assert limit.active == 0 and group.active == 0


def test_a_missing_group_limit_fails_only_that_groups_sites() -> None:
    """The server does not know the group's limit: its site gets SlotError naming it; a
    site outside the group still runs."""
    limit, group = FakeLimit(2), FakeLimit(1)
    api = FakeSlotApi(limit, {GROUP: group}, missing=[GROUP])
    with group_pool(limit, group, ["g1", "o1"], ["g1"], api=api) as pool:
        with pytest.raises(SlotError, match="'cap:host' does not exist"), pool.slot("g1"):
            pass
        with pool.slot("o1"):
            assert limit.active == 1
    assert limit.active == 0


class SlowRelease(FakeSlotApi):
    """A server that takes `delay` seconds to give a lease back, counting it until then."""

    delay = 0.5

    def release(self, lease: UUID) -> None:
        time.sleep(self.delay)
        super().release(lease)


def test_a_groups_next_site_starts_as_soon_as_its_slot_comes_back() -> None:
    """Group cap 1, global cap 2 (prefetched), a server slow to give a lease back (0.5 s):
    g1's pair goes straight to g2, the group's next site in line, so g2 starts right after g1
    ends, with no release and no new acquire in between (a refusal that predates the release
    would pass the group over for 5 s, `group_recheck`)."""
    limit, group = FakeLimit(2), FakeLimit(1)
    timeline = Timeline(["g1", "g2"])
    api = SlowRelease(limit, {GROUP: group})
    with group_pool(
        limit, group, ["g1", "g2", "o1"], ["g1", "g2"], 2, api, group_recheck=5.0
    ) as pool:
        threads = [
            timeline.thread(pool, "g1", 1.0),
            timeline.thread(pool, "g2", 0.1),
            timeline.thread(pool, "o1", 0.1),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert set(timeline.spans) == {"g1", "g2", "o1"}
    assert timeline.group_peak == 1
    handover = timeline.spans["g2"][0] - timeline.spans["g1"][1]
    assert 0 <= handover < 0.3, timeline.spans
    assert api.asked.count(("cap", GROUP)) == 1, api.asked  # one pair, handed on


def test_a_pool_made_for_one_site_learns_the_others_and_their_group() -> None:
    """A Dask worker's pool is made by the first task run it gets, which carries only its
    own site: the sites it learns later (`add_sites`) get slots in the order they joined,
    and the grouped ones still take turns at their group's cap of 1."""
    group_sites = ["g1", "g2", "g3"]
    limit, group = FakeLimit(3), FakeLimit(1)
    timeline = Timeline(group_sites)
    with group_pool(limit, group, ["first"], []) as pool:
        pool.add_sites(["first", "g1", "o1"], {"g1": GROUP})  # "first" again: a no-op
        pool.add_sites(["g2", "g3"], {"g2": GROUP, "g3": GROUP})
        threads = [timeline.thread(pool, s, 0.3) for s in ["first", *group_sites, "o1"]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    assert set(timeline.spans) == {"first", "o1", *group_sites}
    assert timeline.group_peak == 1 and group.peak == 1
    assert timeline.peak <= 3 and limit.peak <= 3
    assert limit.active == 0 and group.active == 0
