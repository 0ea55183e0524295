"""Retry delays for a site: exponential, linear or fixed, each capped.

The delay before retry ``n`` (``n = 1`` is the second attempt) is::

    exponential: min(max_delay, base * 2 ** (n - 1))     1, 2, 4, 8 ...
    linear:      min(max_delay, base * n)                1, 2, 3, 4 ...
    fixed:       min(max_delay, base)                    1, 1, 1, 1 ...

Prefect adds jitter on top (``retry_jitter_factor``): a delay ``d`` becomes a
random value of mean ``d``, at most ``d * (1 + jitter)``.
"""

from __future__ import annotations

from typing import Literal

Backoff = Literal["exponential", "linear", "fixed"]


def retry_delay(kind: Backoff, base: float, max_delay: float, retry: int) -> float:
    """Seconds to wait before retry number `retry` (1-based)."""
    if retry < 1:
        raise ValueError(f"retry = {retry}: expected 1 or more")
    if kind == "exponential":
        # Compare exponents, not values, so huge retry numbers can't overflow.
        raw = max_delay if retry > 64 else base * 2 ** (retry - 1)
    elif kind == "linear":
        raw = base * retry
    elif kind == "fixed":
        raw = base
    else:
        raise ValueError(f"retry_backoff = {kind!r}: expected exponential, linear or fixed")
    return float(min(max_delay, raw))


def retry_delays(kind: Backoff, base: float, max_delay: float, attempts: int) -> list[float]:
    """The delays between `attempts` total attempts: one fewer than the attempts."""
    return [retry_delay(kind, base, max_delay, n) for n in range(1, attempts)]
