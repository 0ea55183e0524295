"""Times each task-runner `submit` of a flow process (bench/per_site.py puts this folder on
PYTHONPATH after the code it measures; Python imports `sitecustomize` at start-up).

Where $BENCH_SUBMIT_LOG is set, the Dask task runner's `submit` (prefect-dask's, and this
code's `flows.engine.dask_runner` where it exists) appends its seconds to that file, one line
per outermost call: a fallback to prefect-dask's own `submit` is not counted twice.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def _install(log: str) -> None:
    try:
        from prefect_dask.task_runners import DaskTaskRunner
    except ImportError:  # no dask extra: nothing to time
        return
    classes: list[Any] = [DaskTaskRunner]
    try:
        from flows.engine.dask_runner import SharedContextDaskRunner
    except ImportError:  # the code before item 5
        pass
    else:
        classes.append(SharedContextDaskRunner)
    inside = threading.local()
    lock = threading.Lock()

    def timed(original: Any) -> Any:
        def submit(self: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(inside, "active", False):
                return original(self, *args, **kwargs)
            inside.active = True
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                took = time.perf_counter() - started
                inside.active = False
                with lock, open(log, "a", encoding="utf-8") as handle:
                    handle.write(f"{took:.6f}\n")

        return submit

    for cls in classes:
        cls.submit = timed(cls.__dict__["submit"])


if os.environ.get("BENCH_SUBMIT_LOG"):
    _install(os.environ["BENCH_SUBMIT_LOG"])
