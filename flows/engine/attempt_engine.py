"""The attempt engine: one attempt of one site, in the shape of Prefect's own task engine.

`AttemptEngine` prepares the attempt, runs it under the slot (`begin_run`), picks one handler
per outcome (`handle_success`, `handle_check_failure`, `handle_retry`, `handle_failure`,
`handle_no_slot`, `handle_cancelled`) returning a `Handled` (data), and `end`s it, the one
place a site is finished. Whether a failure is retried is decided once, by
`flows.engine.outcomes.retry_decision`.

Each attempt's full output goes to its log file (`flows.process.logfile`), under the site's
output folder; the first attempt of a site in a run prunes the older runs' logs
(`keep_logs`). The report lists this run's attempt logs as absolute paths.

The halt (`pipeline.halt`, `flows.halt`) is checked where a site is about to start: before it
asks for a slot, and again once it has one. A final failure is counted while its slot is still
held (`LocalRun.site_done`), so the site that would get that slot next already sees the halt.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.client.schemas.objects import State
from prefect.logging import get_run_logger
from prefect.states import Cancelled

from flows.backoff import retry_delays
from flows.checks import check_result
from flows.config import SiteSettings, build_argv
from flows.engine.failure import SiteAttemptFailed
from flows.engine.outcomes import RetryDecision, retry_decision
from flows.engine.site_job import SiteJob
from flows.names import PIPELINE_OUTPUT, SITE_EVENT
from flows.process.attempt import AttemptOutcome, Ending, run_attempt
from flows.process.control import control_for
from flows.process.logfile import attempt_log_path, prune_logs, run_logs
from flows.report import SiteReport, StoppedBy, with_usage
from flows.slots import SlotError, WaitStopped
from flows.slots.sharing import LocalRun
from flows.timeouts import SiteTimeout


@dataclass(frozen=True)
class Handled:
    """An attempt's outcome as data: what the task run returns or raises (`result`), whether
    the site is done (`final`: it will not ask for a slot again), and the log line to write
    (`message`, `args`, `level`, `event`)."""

    result: SiteReport | State[Any] | BaseException
    final: bool = True
    level: int = logging.INFO
    message: str | None = None
    args: tuple[Any, ...] = ()
    event: str | None = None


STOPPED_BY: dict[Ending | None, StoppedBy] = {
    "timed_out": "timeout",
    "stalled": "stall",
    "over_memory": "memory",
}
"""What stopped an attempt (`AttemptOutcome.ending`), as the report says it (`stopped_by`)."""


class AttemptEngine:
    """One attempt of one site, in the shape of Prefect's task engine: `begin_run` runs the
    pipeline under a slot, `dispatch` picks the outcome's handler, `end` acts on it."""

    def __init__(
        self,
        site: str,
        job: SiteJob,
        run: LocalRun,
        attempt: int,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self.site, self.job, self.run, self.attempt = site, job, run, attempt
        self.config = job.plan.config
        self.settings = job.plan.site(site)  # the site's own entry, else the config's
        self.of = self.settings.retry_count
        self.limit = job.timeout(site)
        self.logger = logger if logger is not None else get_run_logger()
        self.counted = False  # this attempt's final outcome was counted towards the halt

    def begin_run(self, out_dir: Path) -> AttemptOutcome | SlotError | None:
        """Run the pipeline while holding a slot. None: the flow run stopped before it began."""
        argv = build_argv(self.config, self.site, self.attempt, out_dir, self.settings.flags)
        env = pipeline_env(self.settings, self.site, self.attempt, out_dir, self.job)
        if self._held_back(fresh=False):
            return None
        try:
            with self.run.pool.slot(self.site, on_long_wait=self._long_wait):
                if self._held_back(fresh=True):
                    return None
                if self.attempt == 1:
                    self._prune_logs(out_dir)
                outcome = self._run_pipeline(argv, env, out_dir)
                self._count(outcome)
                return outcome
        except SlotError as exc:
            return exc
        except WaitStopped:  # the run stops or halted while this site waited
            return None

    def _long_wait(self, line: str) -> None:
        """A long wait for a slot: who holds the cap, in the site's log and the live view."""
        self.logger.warning(line, extra={SITE_EVENT: "waiting"})

    def _held_back(self, fresh: bool) -> bool:
        """The flow run stops or halted: this attempt does not start."""
        return self.run.stopping.is_set() or self.run.halted(fresh=fresh) is not None

    def _count(self, outcome: AttemptOutcome) -> None:
        """A final failure (or a success) counts towards the halt while the slot is held,
        unless the run is stopping (a stopped pipeline is not a failure of its own)."""
        if self.run.stopping.is_set():
            return
        status = outcome.status
        if status != "succeeded" and self.decision(outcome).retry:
            return
        self.counted = True
        self.run.site_done(self.site, "failed" if status == "not_started" else status)

    def _prune_logs(self, out_dir: Path) -> None:
        """The older runs' attempt logs go (`keep_logs`); that failing is only a warning."""
        try:
            prune_logs(out_dir, self.config.keep_logs, current=str(self.job.flow_run_id))
        except Exception as exc:
            self.logger.warning("could not delete old attempt logs in %s: %s", out_dir, exc)

    def _run_pipeline(self, argv: list[str], env: dict[str, str], out_dir: Path) -> AttemptOutcome:
        config, logger = self.config, self.logger
        logger.info(
            "attempt %d/%d started; %s",
            self.attempt,
            self.of,
            self.limit.why,
            extra={SITE_EVENT: "started"},
        )
        logger.debug("argv: %s", argv)
        return run_attempt(
            argv,
            cwd=self.job.plan.working_dir,
            env=env,
            timeout=self.limit.seconds,
            kill_grace=config.kill_grace_seconds,
            log=lambda line: logger.info(line, extra={PIPELINE_OUTPUT: True}),
            max_log_lines=config.max_log_lines,
            owner=str(self.job.flow_run_id),
            control=control_for(config.process_control),
            stall_timeout=config.stall_timeout,
            log_file=attempt_log_path(out_dir, str(self.job.flow_run_id), self.attempt),
            warn=logger.warning,
            memory_limit=self.settings.memory_limit,
        )

    def dispatch(
        self, outcome: AttemptOutcome | SlotError | None, out_dir: Path | None = None
    ) -> Handled:
        """The handler of `begin_run`'s outcome (`out_dir`: where its attempt logs are). A
        site whose own outcome tripped a `when: now` halt is not cancelled by it."""
        stopping = self.run.stopping.is_set() and not self.counted
        if outcome is None or (isinstance(outcome, SlotError) and stopping):
            return self.handle_cancelled(self.attempt - 1)
        if isinstance(outcome, SlotError):
            return self.handle_no_slot(outcome)
        usage = self.job.record_usage(self.site, self.attempt, outcome)
        if stopping:
            return self.handle_cancelled(
                self.attempt, outcome.duration_s, outcome.stderr_tail, usage
            )
        logs = log_paths(out_dir, str(self.job.flow_run_id)) if out_dir is not None else []
        report = outcome_report(self.site, self.attempt, outcome, self.limit, logs, usage)
        if outcome.status == "succeeded":
            return self.handle_success(outcome, report)
        return self.handle_failure(outcome, report)

    def handle_success(self, outcome: AttemptOutcome, report: SiteReport) -> Handled:
        """The pipeline succeeded: the result checks (if any) have the last word."""
        checks = self.config.result_checks
        if checks is not None:
            history = self.job.check_history.get(self.site, ())
            verdict = check_result(outcome.result, checks, history)
            report.check = verdict.to_json(checks.field)
            if not verdict.ok and checks.on_fail == "fail":
                return self.handle_check_failure(report, verdict.reason)
            if not verdict.ok:
                self.logger.warning(
                    "result check: %s (on_fail: warn; the site succeeds)", verdict.reason
                )
        return Handled(
            message="attempt %d/%d succeeded in %.1fs",
            args=(self.attempt, self.of, outcome.duration_s),
            event="succeeded",
            result=report,
        )

    def handle_check_failure(self, report: SiteReport, reason: str | None) -> Handled:
        """The scraper ran fine and the data is what it is: retrying can't help."""
        report.status, report.kind, report.error = "failed", "result check", reason
        return Handled(
            level=logging.ERROR,
            message="attempt %d/%d: result check failed: %s; not retried",
            args=(self.attempt, self.of, reason),
            event="failed",
            result=SiteAttemptFailed(report, retryable=False),
        )

    def handle_failure(self, outcome: AttemptOutcome, report: SiteReport) -> Handled:
        """Failed, timed out or could not start: retried (`handle_retry`), or final."""
        decision = self.decision(outcome)
        what = (
            f"attempt {self.attempt}/{self.of} {outcome.error}"
            if outcome.status == "timed_out"
            else f"attempt {self.attempt}/{self.of} failed: {outcome.error}"
        )
        if decision.retry:
            return self.handle_retry(what, report)
        return Handled(
            level=logging.ERROR,
            message="%s; %s",
            args=(what, decision.why),
            event=report.status,
            result=SiteAttemptFailed(report, retryable=False),
        )

    def decision(self, outcome: AttemptOutcome) -> RetryDecision:
        """Whether this failed attempt is retried (`flows.engine.outcomes.retry_decision`)."""
        return retry_decision(
            outcome.status,
            outcome.exit_code,
            self.attempt,
            self.of,
            self.config.non_retryable_exit_codes,
            cause=outcome.cause,
            non_retryable_errors=self.config.non_retryable_error_patterns(),
        )

    def handle_retry(self, what: str, report: SiteReport) -> Handled:
        """Another attempt follows (Prefect schedules it): the site is not finished."""
        self.run.retrying[self.site] = report  # what a stop in the retry delay reports
        config = self.config
        delay = retry_delays(
            config.async_settings.retry_backoff, config.retry_delay, config.retry_max_delay, self.of
        )[self.attempt - 1]
        then = f"retrying in ~{delay:g}s" if delay else "retrying now"
        return Handled(
            final=False,
            level=logging.WARNING,
            message="%s; %s",
            args=(what, then),
            event="retrying",
            result=SiteAttemptFailed(report, retryable=True),
        )

    def handle_no_slot(self, exc: SlotError) -> Handled:
        """The API kept failing (api_patience) or the limit is gone: retrying can't help."""
        report = SiteReport(
            self.site, "failed", self.attempt - 1, None, 0.0, str(exc), kind="no slot"
        )
        return Handled(
            level=logging.ERROR,
            message="no slot: %s",
            args=(exc,),
            event="failed",
            result=SiteAttemptFailed(report, retryable=False),
        )

    def handle_cancelled(
        self,
        attempts: int,
        duration_s: float = 0.0,
        stderr_tail: list[str] | None = None,
        usage: list[dict[str, Any]] | None = None,
    ) -> Handled:
        """The flow run is stopping (Ctrl-C, SIGTERM): this site ends Cancelled, not Failed,
        with its report as the state's data; a pipeline it was running has been stopped."""
        reason = self.run.stop_reason or self.run.halt_reason or "the flow run is stopping"
        report = SiteReport(
            self.site,
            "cancelled",
            attempts,
            None,
            duration_s,
            reason,
            stderr_tail=stderr_tail or [],
        )
        with_usage(report, usage or [])
        return Handled(
            level=logging.WARNING,
            message="cancelled: %s",
            args=(reason,),
            event="failed",
            result=Cancelled(message=reason, data=report),
        )

    def end(self, handled: Handled) -> SiteReport | State[Any]:
        """The one place a site is finished: every final outcome finishes it exactly once
        (before its log line, so a waiting site gets the slot order at once); a site that
        will retry is not. Then the log line, then the task run's result or exception."""
        if handled.final:
            self.run.pool.site_finished(self.site)
        if handled.message is not None:
            self.logger.log(
                handled.level, handled.message, *handled.args, extra={SITE_EVENT: handled.event}
            )
        if isinstance(handled.result, BaseException):
            raise handled.result
        return handled.result


def pipeline_env(
    settings: SiteSettings, site: str, attempt: int, out_dir: Path, job: SiteJob
) -> dict[str, str]:
    """The pipeline's environment: ours, the config's env with the site's own over it, and
    the attempt's `SITE*` variables."""
    return {
        **os.environ,
        **settings.env,  # the config's env, with the site's own over it
        "SITE": site,
        "SITE_ATTEMPT": str(attempt),
        "SITE_OUTPUT_DIR": str(out_dir),
        "SITE_FLOW_RUN_ID": str(job.flow_run_id),
    }


def log_paths(out_dir: Path, flow_run_id: str) -> list[str]:
    """This run's attempt logs of the site, in attempt order (absolute paths)."""
    try:
        return [str(path) for path in run_logs(out_dir, flow_run_id)]
    except OSError:
        return []


def outcome_report(
    site: str,
    attempt: int,
    outcome: AttemptOutcome,
    limit: SiteTimeout,
    logs: list[str],
    usage: list[dict[str, Any]],
) -> SiteReport:
    """The site's report after an attempt that ran (`not_started` reads as `failed`), with
    its attempts' `usage` so far."""
    report = SiteReport(
        site=site,
        status="failed" if outcome.status == "not_started" else outcome.status,
        attempts=attempt,
        exit_code=outcome.exit_code,
        duration_s=outcome.duration_s,
        error=outcome.error,
        result=outcome.result,
        stderr_tail=outcome.stderr_tail,
        timeout_s=limit.seconds,
        cause=outcome.cause,
        logs=logs,
        stopped_by=STOPPED_BY.get(outcome.ending),
    )
    return with_usage(report, usage)
