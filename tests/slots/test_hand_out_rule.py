"""The hand-out order's rules, on `HandOutRule` alone: no threads, no clock, no server."""

from __future__ import annotations

from collections.abc import Collection

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.slots.hand_out_rule import HandOutRule

SITES = [f"s{i}" for i in range(8)]
NEVER = 1e9  # a patience that never runs out in these tests

indexes = st.sets(st.integers(0, len(SITES) - 1))


def order_with(
    *, started: Collection[int] = (), finished: Collection[int] = (), patience: float = NEVER
) -> HandOutRule:
    """An order over SITES where the sites at `started` and `finished` did so."""
    order = HandOutRule(SITES, patience)
    for i in sorted(started):
        order.started(SITES[i])
    for i in sorted(finished):
        order.finished(SITES[i])
    return order


def test_with_one_slot_only_the_first_site_in_the_list_gets_it() -> None:
    """Nobody started yet, one slot parked: the later sites waiting don't get it, and once
    the first site waits too, it does."""
    order = HandOutRule(SITES, NEVER)
    for site in reversed(SITES[1:]):
        order.wait(site, now=0.0)
    assert order.next_in_line(parked=1, now=1.0) is None
    order.wait("s0", now=1.0)
    assert order.next_in_line(parked=1, now=1.0) == "s0"


def test_with_k_slots_parked_the_first_k_unstarted_sites_may_take_them() -> None:
    """3 slots parked, nobody started: s2 (the third) may take one while s0 and s1 don't
    ask; s3 (the fourth) may not."""
    order = HandOutRule(SITES, NEVER)
    order.wait("s3", now=0.0)
    assert order.next_in_line(parked=3, now=0.0) is None
    order.wait("s2", now=0.0)
    assert order.next_in_line(parked=3, now=0.0) == "s2"
    assert order.next_in_line(parked=4, now=0.0) == "s2"  # earliest of the eligible


def test_no_slot_parked_counts_as_one() -> None:
    """`parked=0` widens nothing: the frontier site is in line, the next one is not."""
    order = HandOutRule(SITES, NEVER)
    order.wait("s1", now=0.0)
    assert order.next_in_line(parked=0, now=0.0) is None
    order.wait("s0", now=0.0)
    assert order.next_in_line(parked=0, now=0.0) == "s0"


def test_patience_makes_a_site_out_of_line_eligible_after_it_runs_out() -> None:
    """s5 waits from t=10 with patience 2: not eligible at t=11.9, eligible at t=12."""
    order = HandOutRule(SITES, patience=2.0)
    order.wait("s5", now=10.0)
    assert order.next_in_line(parked=1, now=11.9) is None
    assert order.next_in_line(parked=1, now=12.0) == "s5"


def test_zero_patience_makes_every_waiting_site_eligible() -> None:
    """patience=0 (a Dask worker's pool): sites get slots as they ask, earliest first."""
    order = HandOutRule(SITES, patience=0.0)
    order.wait("s6", now=0.0)
    order.wait("s4", now=0.0)
    assert order.next_in_line(parked=1, now=0.0) == "s4"


def test_a_retry_needs_no_turn_but_an_earlier_site_in_line_goes_first() -> None:
    """s3 started and its retry waits: it takes the slot though s0 (in line) never asked;
    once s0 waits for its first attempt, s0 (earlier in the list) goes first."""
    order = order_with(started={3})
    order.wait("s3", now=0.0)
    assert order.next_in_line(parked=1, now=0.0) == "s3"
    order.wait("s0", now=0.0)
    assert order.next_in_line(parked=1, now=0.0) == "s0"


@given(started=indexes, finished=indexes)
def test_the_frontier_is_the_first_site_neither_started_nor_finished(
    started: set[int], finished: set[int]
) -> None:
    """Whatever started or finished, in any order, the frontier stops at the first other site."""
    order = order_with(started=started, finished=finished)
    done = started | finished
    expected = next((i for i in range(len(SITES)) if i not in done), len(SITES))
    assert order.frontier == expected


@given(started=indexes, waiting=indexes, parked=st.integers(1, 3))
def test_a_waiting_started_site_is_always_eligible(
    started: set[int], waiting: set[int], parked: int
) -> None:
    """A retry (a started site waiting) never goes without: some site gets the slot, and
    it is no later in the list than the earliest waiting retry."""
    order = order_with(started=started)
    for i in waiting:
        order.wait(SITES[i], now=0.0)
    retries = started & waiting
    chosen = order.next_in_line(parked, now=0.0)
    if retries:
        assert chosen is not None and SITES.index(chosen) <= min(retries)


@given(
    started=indexes,
    finished=indexes,
    waiting=indexes,
    parked=st.integers(1, len(SITES)),
    waited=st.floats(0, 4),
)
def test_the_slot_goes_to_the_earliest_eligible_waiting_site(
    started: set[int], finished: set[int], waiting: set[int], parked: int, waited: float
) -> None:
    """With `parked` slots, the site chosen is the earliest waiting one that is a retry, within
    `parked` sites from the frontier, or out of patience (2 s); None if there is none."""
    order = order_with(started=started, finished=finished, patience=2.0)
    for i in waiting:
        order.wait(SITES[i], now=0.0)
    horizon = order.frontier + parked - 1
    eligible = [i for i in waiting if i in started or i <= horizon or waited >= 2.0]
    chosen = order.next_in_line(parked, now=waited)
    assert chosen == (SITES[min(eligible)] if eligible else None)


@given(asks=st.permutations(range(len(SITES))))
def test_one_slot_serves_sites_in_list_order_whatever_order_they_ask_in(
    asks: list[int],
) -> None:
    """Every site asks (in any order) and each finishes as soon as it started: with one slot
    handed out at a time, they start in list order."""
    order = HandOutRule(SITES, NEVER)
    for i in asks:
        order.wait(SITES[i], now=0.0)
    served = []
    while (site := order.next_in_line(parked=1, now=0.0)) is not None:
        order.started(site)
        order.stop_waiting(site)
        order.finished(site)
        served.append(site)
    assert served == SITES


def test_counts_follow_waiting_and_finishing() -> None:
    """`waiting` counts sites that wait; `unfinished` those without a final outcome."""
    order = HandOutRule(SITES, NEVER)
    order.wait("s0", now=0.0)
    order.wait("s1", now=0.0)
    assert order.waiting == 2 and order.unfinished == len(SITES)
    order.stop_waiting("s0")
    order.finished("s0")
    order.finished("s0")  # twice is once
    assert order.waiting == 1 and order.unfinished == len(SITES) - 1


def test_a_site_not_in_the_list_is_refused() -> None:
    """Waiting for a site the run doesn't have raises KeyError."""
    with pytest.raises(KeyError):
        HandOutRule(SITES, NEVER).wait("elsewhere", now=0.0)
