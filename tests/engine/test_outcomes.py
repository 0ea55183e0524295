"""An attempt's outcomes, without a Prefect server: the one retry decision (every branch),
and the attempt engine's handlers: each final outcome finishes its site exactly once, a site
that will retry is not finished, and each outcome writes its log line and result."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from flows.config import load_plan
from flows.engine.attempt_engine import AttemptEngine, Handled
from flows.engine.failure import SiteAttemptFailed
from flows.engine.outcomes import RetryDecision, retry_decision
from flows.engine.site_job import SiteJob
from flows.process.attempt import AttemptOutcome
from flows.report import SiteReport
from flows.slots import SlotError
from flows.slots.sharing import LocalRun
from tests.conftest import write_config

CODES = [2, 7]


def test_a_command_that_cant_start_is_never_retried() -> None:
    """not_started: no retry, though attempts are left and the exit code is retryable."""
    assert retry_decision("not_started", None, 1, 3, CODES) == RetryDecision(
        False, "not retried: the command can't start"
    )


def test_a_non_retryable_exit_code_is_never_retried() -> None:
    """An exit code in non_retryable_exit_codes: no retry, though attempts are left."""
    assert retry_decision("failed", 7, 1, 3, CODES) == RetryDecision(
        False, "not retried: exit code 7 is in non_retryable_exit_codes"
    )


def test_the_exit_code_rule_applies_to_a_timeout_too() -> None:
    """A timed-out attempt whose exit code is listed is not retried either (as before)."""
    assert retry_decision("timed_out", 2, 1, 3, CODES).why == (
        "not retried: exit code 2 is in non_retryable_exit_codes"
    )


@pytest.mark.parametrize("status", ["failed", "timed_out"])
def test_the_last_attempt_has_no_retries_left(status: str) -> None:
    """A retryable failure or timeout on the last attempt (or past it): no retries left."""
    assert retry_decision(status, 1, 3, 3, CODES) == RetryDecision(False, "no retries left")
    assert retry_decision(status, None, 4, 3, CODES) == RetryDecision(False, "no retries left")


@pytest.mark.parametrize(("status", "code"), [("failed", 1), ("timed_out", None)])
def test_a_retryable_failure_with_attempts_left_retries(status: str, code: int | None) -> None:
    """Attempts left and nothing against it: retry, with no "why not"."""
    assert retry_decision(status, code, 2, 3, CODES) == RetryDecision(True, None)


def test_one_attempt_allowed_means_no_retry() -> None:
    """retry_count 1: the first failure is final."""
    assert retry_decision("failed", 1, 1, 1, []).why == "no retries left"


# -- the engine's handlers --------------------------------------------------------------


class FakePool:
    """Records which sites were finished and which asked for a slot."""

    def __init__(self, slot_error: str | None = None) -> None:
        self.finished: list[str] = []
        self.asked: list[str] = []
        self.slot_error = slot_error

    def site_finished(self, site: str) -> None:
        self.finished.append(site)

    def stop_waits(self, reason: str) -> None:
        self.stopped_waits = reason

    @contextmanager
    def slot(self, site: str, on_long_wait: object = None) -> Iterator[None]:
        self.asked.append(site)
        if self.slot_error is not None:
            raise SlotError(self.slot_error)
        yield


class Lines(logging.Handler):
    """Keeps (level, message, site event) of each record."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.rows.append((record.levelno, record.getMessage(), getattr(record, "site_event", None)))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("tests.outcomes")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)


def engine_for(
    tmp_path: Path, attempt: int = 1, pool: FakePool | None = None, **pipeline: Any
) -> tuple[AttemptEngine, FakePool]:
    plan = load_plan(write_config(tmp_path, ["a"], **pipeline))
    pool = pool or FakePool()
    run = LocalRun(pool=pool)  # type: ignore[arg-type]
    job = SiteJob(plan, uuid4(), ("t",))
    return AttemptEngine("a", job, run, attempt, logging.getLogger("tests.outcomes")), pool


def failed(code: int | None = 1, status: str = "failed") -> AttemptOutcome:
    return AttemptOutcome(status, code, 1.0, error=f"exit code {code}")  # type: ignore[arg-type]


def test_a_success_finishes_the_site_once_and_returns_its_report(
    tmp_path: Path, lines: Lines
) -> None:
    """Succeeded: the site is finished once; the report (with stderr tail) is the result."""
    engine, pool = engine_for(tmp_path, retry_count=3)
    outcome = AttemptOutcome("succeeded", 0, 1.25, result={"n": 1}, stderr_tail=["warn"])
    result = engine.end(engine.dispatch(outcome))
    assert pool.finished == ["a"]
    assert isinstance(result, SiteReport)  # the record itself, not a dict of it
    assert (result.status, result.attempts, result.stderr_tail) == (
        "succeeded",
        1,
        ["warn"],
    )
    assert lines.rows[-1] == (logging.INFO, "attempt 1/3 succeeded in 1.2s", "succeeded")


def test_a_failure_with_attempts_left_does_not_finish_the_site(
    tmp_path: Path, lines: Lines
) -> None:
    """Failed with retries left: raised as retryable, the site stays unfinished."""
    engine, pool = engine_for(tmp_path, attempt=1, retry_count=3)
    with pytest.raises(SiteAttemptFailed) as raised:
        engine.end(engine.dispatch(failed(1)))
    assert raised.value.retryable is True
    assert pool.finished == []
    assert lines.rows[-1] == (
        logging.WARNING,
        "attempt 1/3 failed: exit code 1; retrying now",
        "retrying",
    )


@pytest.mark.parametrize(
    ("attempt", "outcome", "message", "event"),
    [
        (3, failed(1), "attempt 3/3 failed: exit code 1; no retries left", "failed"),
        (
            1,
            failed(2),
            "attempt 1/3 failed: exit code 2; not retried: exit code 2 is in "
            "non_retryable_exit_codes",
            "failed",
        ),
        (
            1,
            failed(None, "not_started"),
            "attempt 1/3 failed: exit code None; not retried: the command can't start",
            "failed",
        ),
        (3, failed(None, "timed_out"), "attempt 3/3 exit code None; no retries left", "timed_out"),
    ],
)
def test_a_final_failure_finishes_the_site_once(
    tmp_path: Path, lines: Lines, attempt: int, outcome: AttemptOutcome, message: str, event: str
) -> None:
    """No retry (last attempt, listed exit code, can't start): not retryable, finished once."""
    engine, pool = engine_for(tmp_path, attempt=attempt, retry_count=3)
    with pytest.raises(SiteAttemptFailed) as raised:
        engine.end(engine.dispatch(outcome))
    assert raised.value.retryable is False
    assert raised.value.report.status == event
    assert pool.finished == ["a"]
    assert lines.rows[-1] == (logging.ERROR, message, event)


def test_no_slot_finishes_the_site_and_counts_no_attempt(tmp_path: Path, lines: Lines) -> None:
    """SlotError: the site fails as "no slot" (not retried), its attempt not counted."""
    engine, pool = engine_for(tmp_path, attempt=2, pool=FakePool("gone"), retry_count=3)
    outcome = engine.begin_run(tmp_path)
    with pytest.raises(SiteAttemptFailed) as raised:
        engine.end(engine.dispatch(outcome))
    report = raised.value.report
    assert (report.kind, report.attempts, report.error) == ("no slot", 1, "gone")
    assert raised.value.retryable is False
    assert pool.finished == ["a"]
    assert lines.rows[-1] == (logging.ERROR, "no slot: gone", "failed")


def test_a_failed_result_check_finishes_the_site_without_retry(
    tmp_path: Path, lines: Lines
) -> None:
    """The scraper succeeded but the check fails (on_fail: fail): failed, not retried."""
    engine, pool = engine_for(tmp_path, retry_count=3, result_checks={"field": "n", "min": 5})
    with pytest.raises(SiteAttemptFailed) as raised:
        engine.end(engine.dispatch(AttemptOutcome("succeeded", 0, 1.0, result={"n": 1})))
    assert (raised.value.report.status, raised.value.report.kind) == ("failed", "result check")
    assert raised.value.retryable is False
    assert pool.finished == ["a"]
    level, message, event = lines.rows[-1]
    assert (level, event) == (logging.ERROR, "failed")
    assert message.startswith("attempt 1/3: result check failed: ")
    assert message.endswith("; not retried")


def test_a_stopping_run_cancels_before_the_slot(tmp_path: Path, lines: Lines) -> None:
    """The flow run is stopping: no slot is asked for, the site ends Cancelled, finished."""
    engine, pool = engine_for(tmp_path, attempt=2)
    engine.run.stop("Ctrl-C")
    result = engine.end(engine.dispatch(engine.begin_run(tmp_path)))
    assert pool.asked == [] and pool.finished == ["a"]
    assert not isinstance(result, SiteReport) and result.is_cancelled()
    assert (result.data.status, result.data.attempts) == ("cancelled", 1)
    assert lines.rows[-1] == (logging.WARNING, "cancelled: Ctrl-C", "failed")


def test_a_stopping_run_cancels_an_attempt_that_ran(tmp_path: Path) -> None:
    """Stopped while it ran: Cancelled, the attempt counted, its duration and stderr kept."""
    engine, pool = engine_for(tmp_path, attempt=2)
    engine.run.stop("SIGTERM")
    result = engine.end(engine.dispatch(AttemptOutcome("failed", -15, 3.0, stderr_tail=["x"])))
    assert pool.finished == ["a"]
    assert not isinstance(result, SiteReport)
    data = result.data
    assert isinstance(data, SiteReport)
    assert (data.attempts, data.duration_s, data.stderr_tail) == (2, 3.0, ["x"])


def test_an_error_before_the_slot_finishes_the_site_and_is_raised(tmp_path: Path) -> None:
    """An ending that is an exception (the output folder can't be made): finished, raised."""
    engine, pool = engine_for(tmp_path)
    with pytest.raises(OSError, match="read-only"):
        engine.end(Handled(OSError("read-only")))
    assert pool.finished == ["a"]


# -- non_retryable_errors and the halt (issue 22) ---------------------------------------

PATTERNS = [re.compile(r"^ModuleNotFoundError:"), re.compile(r"ImportError")]
MISSING = "ModuleNotFoundError: No module named 'pandas'"


def test_a_cause_that_matches_a_rule_is_never_retried() -> None:
    """A failed attempt whose cause one rule finds: no retry, though attempts are left; the
    why names the first rule that matched, as written."""
    assert retry_decision("failed", 1, 1, 3, CODES, MISSING, PATTERNS) == RetryDecision(
        False, "not retried: the cause matches non_retryable_errors rule '^ModuleNotFoundError:'"
    )
    assert retry_decision("failed", 1, 1, 3, CODES, "x: ImportError: y", PATTERNS).why == (
        "not retried: the cause matches non_retryable_errors rule 'ImportError'"
    )


@pytest.mark.parametrize(
    ("status", "cause", "patterns"),
    [
        ("failed", "ConnectionError: reset by peer", PATTERNS),  # no rule finds it
        ("failed", None, PATTERNS),  # no cause read
        ("failed", MISSING, []),  # non_retryable_errors: [] turns the rule off
        ("timed_out", MISSING, PATTERNS),  # a timeout's cause is only its last line
    ],
)
def test_a_cause_no_rule_finds_retries(
    status: str, cause: str | None, patterns: list[re.Pattern[str]]
) -> None:
    """No rule finds the cause (or there is none, or no rules, or it timed out): the usual
    decision, a retry while attempts are left."""
    assert retry_decision(status, 1, 1, 3, CODES, cause, patterns) == RetryDecision(True, None)


def test_the_default_rules_stop_a_missing_module_at_attempt_one(
    tmp_path: Path, lines: Lines
) -> None:
    """The default non_retryable_errors: a ModuleNotFoundError cause ends the site failed on
    attempt 1 of 3, finished once, the log line naming the cause and the rule."""
    engine, pool = engine_for(tmp_path, attempt=1, retry_count=3)
    outcome = AttemptOutcome("failed", 1, 1.0, error=f"exit code 1: {MISSING}", cause=MISSING)
    with pytest.raises(SiteAttemptFailed) as raised:
        engine.end(engine.dispatch(outcome))
    assert raised.value.retryable is False
    assert raised.value.report.cause == MISSING
    assert pool.finished == ["a"]
    assert lines.rows[-1] == (
        logging.ERROR,
        f"attempt 1/3 failed: exit code 1: {MISSING}; not retried: the cause matches "
        "non_retryable_errors rule '^ModuleNotFoundError:'",
        "failed",
    )


def test_a_halted_run_starts_no_attempt(tmp_path: Path, lines: Lines) -> None:
    """The run halted: no slot is asked for; the site ends Cancelled with the halt's reason,
    its earlier attempts counted, finished once."""
    engine, pool = engine_for(tmp_path, attempt=2)
    engine.run.halt("the run halted after 3 failures (halt: 3 failed)")
    result = engine.end(engine.dispatch(engine.begin_run(tmp_path)))
    assert pool.asked == [] and pool.finished == ["a"]
    assert not isinstance(result, SiteReport) and result.is_cancelled()
    assert (result.data.status, result.data.attempts, result.data.error) == (
        "cancelled",
        1,
        "the run halted after 3 failures (halt: 3 failed)",
    )


def test_a_halt_that_comes_while_waiting_for_the_slot_stops_the_start(tmp_path: Path) -> None:
    """The halt trips while the site waits for its slot: once it has the slot it checks again,
    and does not start."""
    engine, pool = engine_for(tmp_path, attempt=1)

    @contextmanager
    def slot(site: str, on_long_wait: object = None) -> Iterator[None]:
        pool.asked.append(site)
        engine.run.halt("the run halted after 1 failure (halt: 1 failed)")
        yield

    pool.slot = slot  # type: ignore[method-assign]
    result = engine.end(engine.dispatch(engine.begin_run(tmp_path)))
    assert pool.asked == ["a"] and pool.finished == ["a"]
    assert not isinstance(result, SiteReport) and result.is_cancelled()
    assert result.data.attempts == 0


@pytest.mark.parametrize(
    ("ending", "stopped_by"),
    [("timed_out", "timeout"), ("stalled", "stall"), ("over_memory", "memory"), ("exited", None)],
)
def test_what_stopped_the_attempt_is_in_its_report(
    tmp_path: Path, ending: str, stopped_by: str | None
) -> None:
    """The attempt's `ending` is the report's `stopped_by` (the summary's), as data: a
    timeout, a stall and going over memory are all `timed_out`, told apart only by it."""
    engine, _ = engine_for(tmp_path, retry_count=1)
    status = "failed" if ending == "exited" else "timed_out"
    outcome = AttemptOutcome(status, -15, 1.0, error="stopped", ending=ending)  # type: ignore[arg-type]
    with pytest.raises(SiteAttemptFailed) as raised:
        engine.end(engine.dispatch(outcome))
    assert raised.value.report.stopped_by == stopped_by
    assert raised.value.report.to_json()["stopped_by"] == stopped_by


def test_the_task_run_s_result_is_the_report_itself(tmp_path: Path) -> None:
    """One record up: the flow reads back the very `SiteReport` the task returned (after
    Prefect's serialization: a pickle round trip), not a dict rebuilt into one."""
    import pickle

    from prefect.states import Cancelled, Completed

    from flows.engine.running import site_report

    engine, _ = engine_for(tmp_path)
    outcome = AttemptOutcome("succeeded", 0, 1.0, stderr_tail=["w"], ending="exited")
    returned = engine.end(engine.dispatch(outcome))
    assert isinstance(returned, SiteReport)
    back = pickle.loads(pickle.dumps(returned))  # noqa: S301  (our own bytes)
    assert site_report("a", Completed(data=back)) is back
    assert site_report("a", Cancelled(data=back)) is back
    assert back == returned and back.stderr_tail == ["w"]
