"""Whether a site's attempt that did not succeed is retried, and why not: one pure decision.

Plain Python (no Prefect): the `run_site` task makes the decision once per attempt, logs its
"why" and carries its verdict in `SiteAttemptFailed.retryable`, which Prefect's
`retry_condition_fn` (`flows.engine.task._should_retry`) reads back.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

NO_RETRIES_LEFT = "no retries left"
CANT_START = "not retried: the command can't start"


@dataclass(frozen=True)
class RetryDecision:
    """`retry`: the site runs another attempt. `why`: why not (None when it retries)."""

    retry: bool
    why: str | None = None


def retry_decision(
    status: str,
    exit_code: int | None,
    attempt: int,
    attempts: int,
    non_retryable_exit_codes: Collection[int],
    cause: str | None = None,
    non_retryable_errors: Sequence[re.Pattern[str]] = (),
) -> RetryDecision:
    """The decision for attempt `attempt` (1-based) of `attempts`, which ended `status`
    ("failed", "timed_out" or "not_started", as `AttemptOutcome.status`) with `exit_code`
    and `cause` (the attempt's cause line, `AttemptOutcome.cause`).

    A command that can't start, an exit code in `non_retryable_exit_codes`, or a failed
    attempt's cause that one of `non_retryable_errors` finds (`re.search`; the first that
    matches is named; not a timeout's) is never retried (retrying can't help); otherwise
    the site retries while attempts are left. A timeout, a stall and a tree over its
    `memory_limit` are all `timed_out`: retried alike.
    """
    if status == "not_started":
        return RetryDecision(False, CANT_START)
    if exit_code in non_retryable_exit_codes:
        return RetryDecision(
            False, f"not retried: exit code {exit_code} is in non_retryable_exit_codes"
        )
    # A timeout's cause is only the last line it printed: it did not end the attempt.
    rule = matching_rule(cause, non_retryable_errors) if status == "failed" else None
    if rule is not None:
        return RetryDecision(
            False, f"not retried: the cause matches non_retryable_errors rule {rule!r}"
        )
    if attempt >= attempts:
        return RetryDecision(False, NO_RETRIES_LEFT)
    return RetryDecision(True)


def matching_rule(cause: str | None, patterns: Sequence[re.Pattern[str]]) -> str | None:
    """The first of `patterns` that `cause` matches (`re.search`), as written; None if none."""
    if not cause:
        return None
    for pattern in patterns:
        if pattern.search(cause):
            return pattern.pattern
    return None
