"""The start order (issue 21): priority, then sites without history, then longest expected
first; `listed` and the sequential loop keep list order."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from flows.start_order import expected_durations, spread_groups, start_order


def test_unknown_sites_start_first_in_list_order_then_the_longest_known() -> None:
    """Sites with no history first (an unknown site may be long), in list order; then the
    known ones, longest expected first; ties keep list order."""
    sites = ["short", "new-1", "long", "mid", "new-2", "mid-too"]
    expected = {"short": 10.0, "long": 3600.0, "mid": 300.0, "mid-too": 300.0}
    order = start_order(sites, expected, {}, "longest_first")
    assert order.sites == ("new-1", "new-2", "long", "mid", "mid-too", "short")
    assert order.line == (
        "order: longest expected first (4 of 6 sites have history; the 2 without start first)"
    )


def test_the_order_line_says_plainly_when_no_site_or_every_site_has_history() -> None:
    """With no history the run starts in list order and says so; with history for every
    site there are no 'others' to start first, and the line names none."""
    sites = ["a", "b", "c"]
    none_known = start_order(sites, {}, {}, "longest_first")
    assert none_known.sites == ("a", "b", "c")
    assert none_known.line == (
        "order: longest expected first (no site has history yet, so as listed)"
    )
    all_known = start_order(sites, {"a": 1.0, "b": 3.0, "c": 2.0}, {"a": 1}, "longest_first")
    assert all_known.sites == ("a", "b", "c")
    assert all_known.line == (
        "order: longest expected first (all 3 sites have history); 1 by priority first"
    )


def test_priority_comes_before_either_rule() -> None:
    """A higher priority starts first, under longest_first and listed alike; a negative one
    starts last."""
    sites = ["a", "b", "c", "d"]
    expected = {"a": 1.0, "b": 100.0, "c": 50.0, "d": 5.0}
    priority = {"d": 2, "a": 1, "b": -1}
    assert start_order(sites, expected, priority, "longest_first").sites == ("d", "a", "c", "b")
    listed = start_order(sites, expected, priority, "listed")
    assert listed.sites == ("d", "a", "c", "b")
    assert listed.line == "order: as listed; 3 by priority first"


def test_listed_keeps_list_order_whatever_the_history() -> None:
    """`order: listed`: list order, history ignored."""
    order = start_order(["a", "b", "c"], {"a": 1.0, "c": 99.0}, {}, "listed")
    assert order.sites == ("a", "b", "c") and order.line == "order: as listed"


def test_the_sequential_loop_keeps_list_order_priorities_and_all() -> None:
    """`use_async: false` (the old loop) always keeps list order."""
    order = start_order(["a", "b", "c"], {"a": 1.0, "c": 99.0}, {"c": 5}, "sequential")
    assert order.sites == ("a", "b", "c")
    assert order.line == "order: as listed (one site at a time)"


def test_expected_duration_is_the_median_of_recent_successes() -> None:
    """One earlier success is enough; a site with none has no expectation."""
    assert expected_durations({"a": [10.0, 30.0, 1000.0], "b": [7.0], "c": []}) == {
        "a": 30.0,
        "b": 7.0,
    }


@given(
    st.lists(st.text(min_size=1, max_size=4), unique=True, max_size=12),
    st.data(),
)
def test_the_order_is_a_permutation_sorted_by_its_rules(
    sites: list[str], data: st.DataObject
) -> None:
    """Every site starts exactly once; within one priority, unknown sites come before known
    ones, and known ones never come before a longer known one."""
    expected = {site: data.draw(st.floats(0, 1e4)) for site in sites if data.draw(st.booleans())}
    priority = {site: data.draw(st.integers(-2, 2)) for site in sites}
    order = start_order(sites, expected, priority, "longest_first").sites
    assert sorted(order) == sorted(sites)
    for first, then in itertools.pairwise(order):
        assert priority[first] >= priority[then]
        if priority[first] == priority[then]:
            assert not (first in expected and then not in expected)
            if first in expected and then in expected:
                assert expected[first] >= expected[then]


def test_group_sites_move_back_behind_sites_that_can_run() -> None:
    """Four sites of a cap-1 group listed first, 4 threads: each group site is followed by
    others that can run, so the threads never fill with group sites that must wait."""
    sites = ["g1", "g2", "g3", "g4", "o1", "o2", "o3", "o4", "o5", "o6"]
    group_of = {s: "host" for s in sites if s.startswith("g")}
    assert spread_groups(sites, group_of, {"host": 1}, 4) == (
        "g1", "o1", "o2", "o3", "g2", "o4", "o5", "o6", "g3", "g4",
    )  # fmt: skip
    assert spread_groups(sites, {}, {}, 4) == tuple(sites)  # no groups: unchanged


@given(
    st.lists(st.sampled_from(["a", "b", None]), max_size=30),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 8),
)
def test_spreading_keeps_every_site_and_each_groups_order(
    groups: list[str | None], cap_a: int, cap_b: int, window: int
) -> None:
    """Every site once; each group's sites, and the ungrouped ones, keep their order; and a
    window holds more of a group than its cap only where nothing else was left to place."""
    sites = [f"s{i}" for i in range(len(groups))]
    group_of = {s: g for s, g in zip(sites, groups, strict=True) if g}
    caps = {"a": cap_a, "b": cap_b}
    out = spread_groups(sites, group_of, caps, window)
    assert sorted(out) == sorted(sites)
    for group in ("a", "b", None):
        members = [s for s in sites if group_of.get(s) == group]
        assert [s for s in out if group_of.get(s) == group] == members
    for end in range(len(out)):
        chunk = out[max(0, end - window + 1) : end + 1]
        group = group_of.get(out[end])
        if group is not None and sum(group_of.get(s) == group for s in chunk) > caps[group]:
            rest = out[end:]  # over the cap: only sites of full groups were left
            full = {g for g in caps if sum(group_of.get(s) == g for s in chunk[:-1]) >= caps[g]}
            assert all(group_of.get(s) in full for s in rest)
