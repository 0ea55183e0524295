"""Config values reach Prefect: the task's options and the task runner, read back from the
objects Prefect will use (no formula re-derived here: literal expected values)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prefect.states import Failed
from prefect.utilities.annotations import NotSet

from flows.config import load_plan
from flows.engine.failure import SiteAttemptFailed
from flows.engine.task import _should_retry, configured_task, site_cache_key
from flows.engine.task_runners import task_runner
from flows.report import SiteReport
from tests.conftest import write_config


def plan_for(tmp_path: Path, **pipeline: Any):
    return load_plan(write_config(tmp_path, ["a", "b", "c"], **pipeline))


@pytest.mark.parametrize(
    ("backoff", "delays"),
    [
        ("exponential", [2.0, 4.0, 8.0]),
        ("linear", [2.0, 4.0, 6.0]),
        ("fixed", [2.0, 2.0, 2.0]),
    ],
)
def test_retries_and_each_backoff_kind_reach_the_task(
    tmp_path: Path, backoff: str, delays: list[float]
) -> None:
    """retry_count 4 = 3 retries; the delays of each backoff kind from retry_delay 2,
    capped by retry_max_delay; the jitter; the tag; our retry condition and cache key."""
    plan = plan_for(
        tmp_path,
        retry_count=4,
        retry_delay=2,
        retry_max_delay=100,
        retry_jitter=0.5,
        concurrency_tag="wired-tag",
        async_settings={"retry_backoff": backoff},
    )
    task = configured_task(plan)
    assert task.retries == 3
    assert task.retry_delay_seconds == delays
    assert task.retry_jitter_factor == 0.5
    assert task.tags == {"wired-tag"}
    assert task.retry_condition_fn is _should_retry
    assert task.cache_key_fn is site_cache_key
    assert task.persist_result is True


def test_the_delay_cap_and_no_jitter_reach_the_task(tmp_path: Path) -> None:
    """retry_max_delay cuts the exponential delays; retry_jitter 0 sets no jitter at all."""
    plan = plan_for(
        tmp_path,
        retry_count=5,
        retry_delay=3,
        retry_max_delay=10,
        retry_jitter=0,
        async_settings={"retry_backoff": "exponential"},
    )
    task = configured_task(plan)
    assert task.retry_delay_seconds == [3.0, 6.0, 10.0, 10.0]
    assert task.retry_jitter_factor in (None, NotSet)


def test_one_attempt_means_no_retry(tmp_path: Path) -> None:
    """retry_count 1: no retries and no delay list."""
    task = configured_task(plan_for(tmp_path, retry_count=1))
    assert task.retries == 0
    assert task.retry_delay_seconds in (0, None, [])


@pytest.mark.parametrize(
    ("cap", "use_async", "threads"), [(2, True, 3), (1, True, 2), (2, False, 1)]
)
def test_the_thread_budget_reaches_the_task_runner(
    tmp_path: Path, cap: int, use_async: bool, threads: int
) -> None:
    """Three sites: the thread pool has cap + spare threads for retries (at most the site
    count), or one thread when sequential."""
    plan = plan_for(tmp_path, max_concurrent_sites=cap, use_async=use_async)
    with task_runner(plan) as runner:
        assert runner._max_workers == threads


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (SiteAttemptFailed(SiteReport("a", "failed", 1, 1, 0.0), retryable=True), True),
        (SiteAttemptFailed(SiteReport("a", "failed", 1, 2, 0.0), retryable=False), False),
        (RuntimeError("a bug in this tool"), True),
    ],
)
def test_prefects_retry_condition_follows_the_attempts_decision(
    tmp_path: Path, error: Exception, retried: bool
) -> None:
    """The retry_condition_fn retries what the attempt decided to retry (and a bug), never
    what it decided not to (a listed exit code, no retries left, no slot, a result check)."""
    task = configured_task(plan_for(tmp_path, retry_count=3))
    assert _should_retry(task, None, Failed(data=error)) is retried  # type: ignore[arg-type]
