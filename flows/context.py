"""What the caller of one run hands the flow: `RunContext`, used as `with RunContext(...):`.

Plain Python, in the manner of Prefect's `ContextModel` or Temporal's activity context::

    with RunContext(stop=stop, on_progress=print):
        run_sites(...)                  # the flow reads RunContext.get().stop / .on_progress

Underneath it is a context variable, not a global: two runs in one process (two threads, or
two tasks on one event loop) each see their own, and the block's end restores what was
there before, even when the block raises. Outside any block `RunContext.get()` is the empty
context (no stop request, no progress callback).

The flow names the class, never the variable: Prefect ships the flow function to Dask workers
by value (cloudpickle) with the globals it names. A ContextVar can't be pickled; a class
imported from a module is pickled by reference.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar

from flows.interrupts import StopRequest

if TYPE_CHECKING:
    from flows.config import RunPlan
    from flows.dask_cluster import LocalDaskCluster

ProgressFn = Callable[[int, int, int], None]
"""`on_progress(done, total, failed)`, called once after each site's final outcome."""


class RunContext:
    """One run's caller-side context: its `stop` request, its `on_progress` callback and
    the local Dask `cluster` it started for the run.

    Read-only once made (the empty default is shared). An instance is entered once at a
    time, like Prefect's contexts; nest a new instance to change what an inner block sees.
    """

    __slots__ = ("_cluster", "_on_progress", "_plan", "_stop", "_token")
    _current: ClassVar[ContextVar[RunContext | None]] = ContextVar(
        "site_pipeline_run_context", default=None
    )

    def __init__(
        self,
        stop: StopRequest | None = None,
        on_progress: ProgressFn | None = None,
        cluster: LocalDaskCluster | None = None,
        plan: RunPlan | None = None,
    ) -> None:
        self._stop = stop
        self._on_progress = on_progress
        self._cluster = cluster
        self._plan = plan
        self._token: Token[RunContext | None] | None = None

    @property
    def stop(self) -> StopRequest | None:
        """Set when the caller wants the run to stop (`flows.interrupts`); None: never."""
        return self._stop

    @property
    def on_progress(self) -> ProgressFn | None:
        """Called by the flow after each site's final outcome; None: nobody listens."""
        return self._on_progress

    @property
    def cluster(self) -> LocalDaskCluster | None:
        """A local Dask cluster the caller started for this run (`flows.dask_cluster`): the
        flow's task runner uses it when its plan asks for a local cluster, and the caller
        closes it. None: the flow starts its own."""
        return self._cluster

    @property
    def plan(self) -> RunPlan | None:
        """The plan the caller loaded and checked for this run (`flows.api`), which the flow
        uses as it is instead of reading the config again. None: the flow loads it from its
        parameters (a deployment's run, in a worker's process)."""
        return self._plan

    @classmethod
    def get(cls) -> RunContext:
        """The innermost entered context in this thread or task; the empty one outside."""
        return cls._current.get() or _EMPTY

    def __enter__(self) -> RunContext:
        if self._token is not None:
            raise RuntimeError("this RunContext is already entered; make a new one to nest")
        self._token = self._current.set(self)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._token is None:
            raise RuntimeError("this RunContext was exited without being entered")
        self._current.reset(self._token)
        self._token = None

    def __repr__(self) -> str:
        return (
            f"RunContext(stop={self.stop!r}, on_progress={self.on_progress!r}, "
            f"cluster={self.cluster!r})"
        )


_EMPTY = RunContext()
"""What `RunContext.get()` returns outside any block: nothing to watch, nobody to tell."""

__all__ = ["ProgressFn", "RunContext"]
