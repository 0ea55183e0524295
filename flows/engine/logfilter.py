"""Keep a site's failure and a failed API call out of tracebacks (a filter on the
`prefect.task_runs` and `prefect.flow_runs` loggers).

A site that fails is an expected outcome, not a bug in this tool; an API call that failed
(the server, or its Redis, down) is the server's trouble, and the record's one line names
the request. Installed where a run starts (the flow, and each task run: a Dask worker is
another process), never on import.
"""

from __future__ import annotations

import logging

from flows.dask_cluster import WorkerWaitEnded
from flows.engine.failure import SiteAttemptFailed
from flows.slots.prefect_api import API_ERRORS


class _NoTracebackForSiteFailures(logging.Filter):
    """A site that fails is an expected outcome, not a bug in this tool: Prefect's
    "Task run failed with exception" record keeps its one line, without the traceback, in
    the UI's logs and on the console. So does its "Encountered exception during execution"
    for a failed API call (`httpx.HTTPStatusError`, `httpx.TransportError`: the line names
    the URL), and for a Dask cluster that gave no worker in `task_runner.worker_wait`
    (`WorkerWaitEnded`: the line names the address and the wait). A real bug keeps its
    traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (SiteAttemptFailed, WorkerWaitEnded, *API_ERRORS)):
            record.exc_info = None
            record.exc_text = None
        return True


def install_traceback_filter() -> None:
    """Add the filter to Prefect's task run and flow run loggers, once per process."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        runs = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForSiteFailures) for f in runs.filters):
            runs.addFilter(_NoTracebackForSiteFailures())
