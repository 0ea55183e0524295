"""`RunContext`: what a caller hands one run, seen only inside its own `with` block."""

from __future__ import annotations

import threading

import cloudpickle
import pytest

from flows.context import RunContext
from flows.interrupts import StopRequest


def _progress(done: int, total: int, failed: int) -> None:
    """A progress callback for the tests; never called."""


def test_outside_any_block_the_context_is_empty() -> None:
    """Outside a block `get()` still returns a context: no stop request, no callback."""
    context = RunContext.get()
    assert context.stop is None and context.on_progress is None


def test_inside_a_block_get_returns_that_context() -> None:
    """`with RunContext(...) as c:` makes `c` the current context, with what it was given."""
    stop = StopRequest()
    with RunContext(stop=stop, on_progress=_progress) as entered:
        assert RunContext.get() is entered
        assert entered.stop is stop and entered.on_progress is _progress
    assert RunContext.get().stop is None


def test_a_nested_block_sees_its_own_and_the_outer_one_comes_back() -> None:
    """An inner block's context hides the outer one until the inner block ends."""
    outer_stop, inner_stop = StopRequest(), StopRequest()
    with RunContext(stop=outer_stop):
        with RunContext(stop=inner_stop, on_progress=_progress):
            assert RunContext.get().stop is inner_stop
        assert RunContext.get().stop is outer_stop
        assert RunContext.get().on_progress is None


def test_the_context_is_reset_after_a_block_that_raises() -> None:
    """An exception leaves the block (and propagates), and the previous context is back."""
    with pytest.raises(ValueError, match="boom"), RunContext(stop=StopRequest()):
        raise ValueError("boom")
    assert RunContext.get().stop is None


def test_two_threads_each_see_their_own_context() -> None:
    """Two runs in one process (two threads, blocks open at the same time) never see each
    other's stop request, and the main thread sees neither."""
    both_inside = threading.Barrier(2, timeout=5)
    seen: dict[str, StopRequest | None] = {}
    stops = {"first": StopRequest(), "second": StopRequest()}

    def run(name: str) -> None:
        with RunContext(stop=stops[name]):
            both_inside.wait()  # the other thread's block is open too
            seen[name] = RunContext.get().stop
            both_inside.wait()

    threads = [threading.Thread(target=run, args=(name,)) for name in stops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert seen == stops
    assert RunContext.get().stop is None


def test_one_instance_cannot_be_entered_twice_at_once() -> None:
    """Entering an instance that is already entered is an error (make a new one to nest);
    the instance can be entered again once its block has ended."""
    context = RunContext()
    with context:
        with pytest.raises(RuntimeError, match="already entered"), context:
            pass
        assert RunContext.get() is context
    with context:
        assert RunContext.get() is context


def test_the_empty_default_cannot_be_changed() -> None:
    """The default is shared by every caller outside a block, so it is read-only."""
    with pytest.raises(AttributeError):
        RunContext.get().stop = StopRequest()  # type: ignore[misc]


def test_code_naming_the_context_pickles_by_value() -> None:
    """A function shipped by value (as Prefect ships a flow to Dask workers) that reads the
    context pickles, and unpickled it still reads the same class's context."""

    def read_stop() -> StopRequest | None:
        return RunContext.get().stop

    shipped = cloudpickle.loads(cloudpickle.dumps(read_stop))
    stop = StopRequest()
    with RunContext(stop=stop):
        assert shipped() is stop
