"""Halt: start no further site once too many have failed (GNU parallel's `--halt`). Plain.

`pipeline.halt` (`flows.config.HaltConfig`) is a count (`failed: 3`: halt at the third failed
site) or a share (`failed: "30%"`: halt once failed / done >= 30 %, judged only once
`min_done` sites are done). A site counts once, when it is finally failed (or timed out):
an attempt that will be retried does not count. "Done" is every site finally succeeded or
failed; cancelled and skipped sites are neither.

`HaltTally` keeps the sites by name, so the same site told twice (by its task, under its slot,
and by the flow, from its final state) counts once. It keeps the reason of the failure that
tripped the rule: the sites still running then may fail too, but the run halted after the
third failure, whoever tells it (the tasks or the flow) and whenever.
"""

from __future__ import annotations

import threading

from flows.config import HaltConfig

FAILED_STATUSES = frozenset({"failed", "timed_out"})
DONE_STATUSES = FAILED_STATUSES | {"succeeded"}


def halt_reason(rule: HaltConfig | None, failed: int, done: int) -> str | None:
    """Why the run halts with `failed` of `done` sites failed, or None (it goes on)."""
    if rule is None or failed < 1:
        return None
    if rule.failed is not None:
        tripped = failed >= rule.failed
    else:
        share = rule.failed_percent or 100.0
        tripped = done >= rule.min_done and failed * 100 >= share * done
    if not tripped:
        return None
    failures = "1 failure" if failed == 1 else f"{failed} failures"
    return f"the run halted after {failures} ({rule.describe()})"


class HaltTally:
    """The sites finally failed and done so far, and the halt they trip (thread-safe)."""

    def __init__(self, rule: HaltConfig | None) -> None:
        self.rule = rule
        self.failed: set[str] = set()
        self.done: set[str] = set()
        self.reason: str | None = None  # the first reason the rule gave: it tripped there
        self._lock = threading.Lock()

    def site_done(self, site: str, status: str) -> str | None:
        """Count `site`, finally `status` (a `SiteReport.status`); the halt's reason once the
        rule trips (the same reason every time after), else None."""
        with self._lock:
            if status in DONE_STATUSES:
                self.done.add(site)
            if status in FAILED_STATUSES:
                self.failed.add(site)
            if self.reason is None:
                self.reason = halt_reason(self.rule, len(self.failed), len(self.done))
            return self.reason
