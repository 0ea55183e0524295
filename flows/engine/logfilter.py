"""Keep a site's failure out of tracebacks (the `prefect.task_runs` logger's filter).

A site that fails is an expected outcome, not a bug in this tool. Installed where a run
starts (the flow, and each task run: a Dask worker is another process), never on import.
"""

from __future__ import annotations

import logging

from flows.engine.failure import SiteAttemptFailed


class _NoTracebackForSiteFailures(logging.Filter):
    """A site that fails is an expected outcome, not a bug in this tool: Prefect's
    "Task run failed with exception" record keeps its one line, without the traceback, in
    the UI's logs and on the console. A real bug keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, SiteAttemptFailed):
            record.exc_info = None
            record.exc_text = None
        return True


def install_traceback_filter() -> None:
    """Add the filter to Prefect's task run logger, once per process."""
    task_runs = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _NoTracebackForSiteFailures) for f in task_runs.filters):
        task_runs.addFilter(_NoTracebackForSiteFailures())
