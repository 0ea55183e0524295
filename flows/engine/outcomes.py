"""Whether a site's attempt that did not succeed is retried, and why not: one pure decision.

Plain Python (no Prefect): the `run_site` task makes the decision once per attempt, logs its
"why" and carries its verdict in `SiteAttemptFailed.retryable`, which Prefect's
`retry_condition_fn` (`flows.engine.task._should_retry`) reads back.
"""

from __future__ import annotations

from collections.abc import Collection
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
) -> RetryDecision:
    """The decision for attempt `attempt` (1-based) of `attempts`, which ended `status`
    ("failed", "timed_out" or "not_started", as `AttemptOutcome.status`) with `exit_code`.

    A command that can't start, or an exit code in `non_retryable_exit_codes`, is never
    retried (retrying can't help); otherwise the site retries while attempts are left.
    """
    if status == "not_started":
        return RetryDecision(False, CANT_START)
    if exit_code in non_retryable_exit_codes:
        return RetryDecision(
            False, f"not retried: exit code {exit_code} is in non_retryable_exit_codes"
        )
    if attempt >= attempts:
        return RetryDecision(False, NO_RETRIES_LEFT)
    return RetryDecision(True)
