"""Waiting in tests: on a condition, with a deadline, never on a bare sleep.

A sleep bets that something has happened by then; on a loaded machine (CI, two pytest-xdist
workers per core) the bet is lost now and then. `wait_until` asks the condition itself, often,
and fails with what it was waiting for when the deadline passes. Deadlines are generous: they
only bound a test that is already failing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], object], timeout: float = 30.0, every: float = 0.01) -> bool:
    """Ask `condition()` every `every` s until it is true or `timeout` s pass; its last
    answer, as a bool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


def wait_until(
    condition: Callable[[], T | None], what: str, timeout: float = 60.0, every: float = 0.05
) -> T:
    """`condition()`'s first true answer, asked every `every` s; AssertionError naming
    `what` when `timeout` s pass first."""
    deadline = time.monotonic() + timeout
    while True:
        answer = condition()
        if answer:
            return answer
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(every)
