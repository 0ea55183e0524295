"""The run's progress, told after each site's final outcome: to the caller's `on_progress`
(`flows.context.RunContext`), and, with `async_settings.progress_reporting`, as a log line
(which the CLI's live view shows) and a progress artifact updated at most once a second."""

from __future__ import annotations

import time
from typing import cast
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows import report
from flows.context import ProgressFn
from flows.engine.prepare import RunLogger
from flows.names import PROGRESS, PROGRESS_KEY
from flows.slots.prefect_api import API_ERRORS, describe_api_error


class ProgressReporter:
    """Counts the sites done and failed, and tells whoever listens after each one."""

    def __init__(
        self, total: int, logger: RunLogger, on_progress: ProgressFn | None, artifact: UUID | None
    ) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self._logger, self._on_progress, self._artifact = logger, on_progress, artifact
        self._updated_at = 0.0

    @classmethod
    def start(
        cls, total: int, logger: RunLogger, on_progress: ProgressFn | None, reporting: bool
    ) -> ProgressReporter:
        """A reporter for `total` sites; with `reporting`, its progress artifact is made now."""
        artifact = (
            cast(UUID, create_progress_artifact(0.0, key=PROGRESS_KEY, description="sites done"))
            if reporting
            else None
        )
        return cls(total, logger, on_progress, artifact)

    def site_done(self, site_report: report.SiteReport) -> report.SiteReport:
        """Count one site's final outcome and tell it; returns the report unchanged."""
        self.done += 1
        self.failed += site_report.status != "succeeded"
        if self._on_progress is not None:
            self._on_progress(self.done, self.total, self.failed)
        if self._artifact is not None:
            self._logger.info(
                report.progress_line(self.done, self.total, self.failed), extra={PROGRESS: True}
            )
            # At most once a second: each update is a blocking API call.
            now = time.monotonic()
            if now - self._updated_at >= 1 or self.done == self.total:
                self._updated_at = now
                self._update_artifact(100.0 * self.done / self.total)
        return site_report

    def _update_artifact(self, percent: float) -> None:
        """Update the progress artifact; an API that fails (a database down for a while)
        costs this update only, never the run: a warning, and the next site tries again."""
        try:
            update_progress_artifact(cast(UUID, self._artifact), percent)
        except API_ERRORS as exc:
            self._logger.warning(
                "could not update the progress artifact: %s", describe_api_error(exc)
            )
