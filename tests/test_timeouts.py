"""Learned timeouts: the formula, its edges, and what the log line says."""

from __future__ import annotations

import pytest

from flows.config import LearnedTimeout
from flows.timeouts import p95, site_timeout, site_timeouts

LEARNED = LearnedTimeout(factor=3.0, min_runs=5, window=20, floor=60)


def test_p95_is_the_nearest_rank() -> None:
    """Of 20 values the 19th smallest; of 5, the largest; of 1, itself; none is an error."""
    assert p95([float(n) for n in range(1, 21)]) == 19.0
    assert p95([5.0, 1.0, 3.0, 2.0, 4.0]) == 5.0
    assert p95([7.0]) == 7.0
    with pytest.raises(ValueError):
        p95([])


def test_enough_history_gives_factor_times_p95_and_says_so() -> None:
    """12 runs of about 180 s: 3 x 180 = 540 s, and the log line tells where it came from."""
    got = site_timeout([170.0] * 11 + [180.0], LEARNED, 3600)
    assert got.seconds == 540
    assert got.why == "timeout 540 s (3 x p95 180 s over 12 runs)"


def test_thin_history_uses_the_configured_timeout() -> None:
    """Fewer successes than min_runs: pipeline.timeout, and the line says why."""
    got = site_timeout([100.0] * 4, LEARNED, 3600)
    assert got.seconds == 3600
    assert "4 successful runs on record, learned_timeout needs 5" in got.why


def test_the_floor_and_the_hard_cap_bound_it() -> None:
    """Fast sites never go below `floor`; slow ones never above `timeout`."""
    low = site_timeout([1.0] * 5, LEARNED, 3600)
    assert low.seconds == 60 and "raised to floor 60 s" in low.why
    high = site_timeout([2000.0] * 5, LEARNED, 3600)
    assert high.seconds == 3600 and "capped by pipeline.timeout 3600 s" in high.why


def test_only_the_last_window_counts() -> None:
    """Old slow runs beyond `window` are forgotten: the last 5 (of 10 s) decide."""
    learned = LearnedTimeout(factor=2.0, min_runs=5, window=5, floor=1)
    got = site_timeout([1000.0] * 10 + [10.0] * 5, learned, 3600)
    assert got.seconds == 20 and "over 5 runs" in got.why


def test_without_learned_timeout_every_site_gets_the_timeout() -> None:
    """Off (absent from the config): the history is ignored."""
    got = site_timeouts(["a", "b"], {"a": [1.0] * 50}, None, 900)
    assert {site: t.seconds for site, t in got.items()} == {"a": 900, "b": 900}
    assert got["a"].why == "timeout 900 s (pipeline.timeout)"
