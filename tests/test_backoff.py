"""Retry delays for each backoff kind, and the cap."""

import pytest

from flows.backoff import retry_delay, retry_delays


def test_exponential_doubles_from_the_base() -> None:
    """exponential: base, 2*base, 4*base ..."""
    assert retry_delays("exponential", 1, 300, 6) == [1, 2, 4, 8, 16]
    assert retry_delays("exponential", 0.5, 300, 4) == [0.5, 1, 2]


def test_linear_adds_the_base() -> None:
    """linear: base, 2*base, 3*base ..."""
    assert retry_delays("linear", 2, 300, 5) == [2, 4, 6, 8]


def test_fixed_repeats_the_base() -> None:
    """fixed: base every time."""
    assert retry_delays("fixed", 3, 300, 4) == [3, 3, 3]


@pytest.mark.parametrize("kind", ["exponential", "linear", "fixed"])
def test_every_delay_is_capped(kind: str) -> None:
    """No delay exceeds retry_max_delay, however many retries."""
    delays = retry_delays(kind, 12, 10, 50)  # type: ignore[arg-type]
    assert len(delays) == 49
    assert max(delays) == 10


def test_huge_retry_numbers_do_not_overflow() -> None:
    """Retry 10_000 of an exponential backoff is just the cap."""
    assert retry_delay("exponential", 1, 300, 10_000) == 300


def test_one_attempt_has_no_delays() -> None:
    """retry_count 1 means no retry and so no delay."""
    assert retry_delays("exponential", 1, 300, 1) == []


def test_bad_arguments_are_refused() -> None:
    """Retry 0 and unknown kinds raise ValueError naming the value."""
    with pytest.raises(ValueError, match="retry = 0"):
        retry_delay("fixed", 1, 10, 0)
    with pytest.raises(ValueError, match="'random'"):
        retry_delay("random", 1, 10, 1)  # type: ignore[arg-type]


def test_a_huge_retry_number_gives_the_cap_not_an_overflow() -> None:
    """Retry 5000 of an exponential backoff: the cap, not 2**4999 (too big for a float)."""
    assert retry_delay("exponential", 1.0, 300.0, 5000) == 300.0
