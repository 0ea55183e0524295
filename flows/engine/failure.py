"""`SiteAttemptFailed`: how a task run attempt says its site's attempt did not succeed.

Prefect puts the exception in the task run's Failed state; the flow reads the site's
report back from it, also across processes (Dask).
"""

from __future__ import annotations

from typing import Any

from flows.report import SiteReport


class SiteAttemptFailed(Exception):
    """An attempt did not succeed. `report` is the site's outcome so far; `retryable`: another
    attempt follows (`flows.engine.outcomes.retry_decision`), so the site is not finished."""

    def __init__(self, report: SiteReport, retryable: bool) -> None:
        self.report = report
        self.retryable = retryable
        super().__init__(
            f"{report.site}: attempt {report.attempts} {report.status}: {report.error}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses processes (Dask) inside the task run's state: rebuild from the fields.
        return (SiteAttemptFailed, (self.report, self.retryable))
