"""Imported by each local Dask worker as it starts (a Dask preload, `flows.dask_cluster`), so
the worker's first task run waits for none of this:

- the modules its task runs use: Prefect, the task, the runner's worker side (about 0.8 s);
- Prefect's collections (`prefect.plugins.load_prefect_collections`: every installed
  package's `prefect.collections` entry point, prefect-dask and prefect-redis among them,
  imported once per process): Prefect loads them on a process's first task run, when it
  rebuilds the flow's context from its serialized form; that was 0.3-0.6 s of the first
  site on each worker (py-spy, 2 workers on 2 cores).
"""

from __future__ import annotations

from prefect.plugins import load_prefect_collections

import flows.engine.dask_runner  # noqa: F401  (imported for the worker's task runs)


def dask_setup(worker: object) -> None:
    """Dask's preload hook, called once as the worker starts."""
    load_prefect_collections()
