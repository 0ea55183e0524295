"""Run one attempt of one site's pipeline as a real process, with a real timeout.

Plain Python: the caller passes a `log` callable (the Prefect task run logger
in production, a list's `append` in tests). The output is read as it comes
(`flows.process.output`), in bounded memory however much the pipeline prints, and
written whole to the attempt's log file (`flows.process.logfile`); the process tree is
started, watched and stopped by a `ProcessControl` backend. A failed attempt's `cause` is
read from the end of its output once, when it ends (`flows.process.cause`).

An attempt ends in one of four ways (`Ending`): the pipeline exits; the `timeout`
passes; with `stall_timeout`, it prints nothing on either pipe for that long; or, with
`memory_limit`, the tree's RSS at a sample is above that many MB (Scrapy's
`MEMUSAGE_LIMIT_MB`, for the whole tree). The last three stop the tree the same way (TERM,
then KILL after `kill_grace`) and are `timed_out`.

The tree is sampled where it is watched, every POLL_SECONDS (`ProcessControl.watch`), and once
more when the attempt ends; the pipeline is reaped with the kernel's own account of it
(`flows.process.rusage`, POSIX): the outcome's `peak_rss_mb` and `cpu_s` are the larger of
the two (`cost`).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flows.process import rusage
from flows.process.cause import cause_of, clean
from flows.process.control import ProcessControl, control_for
from flows.process.logfile import AttemptLog
from flows.process.output import (
    MAX_LINE_BYTES,
    POLL_SECONDS,
    STDERR_TAIL,
    AttemptOutput,
    BoundedLog,
    LogFn,
    Pipes,
    drain,
    open_pipes,
)
from flows.process.trees import TreeUsage

AttemptStatus = Literal["succeeded", "failed", "timed_out", "not_started"]
Ending = Literal["exited", "timed_out", "stalled", "over_memory"]


@dataclass
class AttemptOutcome:
    """What one attempt did. `result` is the JSON object of the last stdout line, if any.

    `cause` is the one line that says why it failed (`flows.process.cause`; for a timeout
    or a stall, the last line seen), and `error` says how it ended, with the cause:
    `exit code 1: ModuleNotFoundError: No module named 'pandas'`, `killed by signal 9:
    <cause>`, `timed out after 30 s: <last line>`, `stalled: no output for 20 s`,
    `over memory: 612 MB > 500 MB`, or the bare `exit code 1` when there is no cause.
    `ending` is how it ended (`exited`, or what stopped it: `timed_out`, `stalled`,
    `over_memory`; None when it did not start). `log_path` is the attempt's full log file
    (None without one); `log_complete` is False
    when it could not be written whole. `peak_rss_mb` (MB) and `cpu_s` (user + system
    seconds): the kernel's account of the reaped tree or the samples' figure, whichever is
    larger (`cost`); both None when neither is known.
    """

    status: AttemptStatus
    exit_code: int | None
    duration_s: float
    error: str | None = None
    result: dict[str, Any] | None = None
    stderr_tail: list[str] = field(default_factory=list)
    lines_total: int = 0
    lines_not_logged: int = 0
    cause: str | None = None
    log_path: str | None = None
    log_complete: bool = True
    peak_rss_mb: float | None = None
    cpu_s: float | None = None
    ending: Ending | None = None


def run_attempt(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str],
    env: Mapping[str, str],
    timeout: float,
    kill_grace: float,
    log: LogFn,
    max_log_lines: int = 200,
    owner: str | None = None,
    control: ProcessControl | None = None,
    stall_timeout: float | None = None,
    log_file: Path | None = None,
    warn: LogFn | None = None,
    memory_limit: float | None = None,
) -> AttemptOutcome:
    """Run `argv` once and wait for it, at most `timeout` seconds.

    `control` (default: this platform's, `flows.process.control`) starts it as a process
    group or a tracked tree. On timeout everything it started is asked to end, then killed
    after `kill_grace`; the same when `stall_timeout` is set and the pipeline prints nothing
    on stdout or stderr for that many seconds. When the pipeline exits, anything it left
    running is stopped too. If this call is interrupted (an exception raised into the
    thread), its processes are stopped before the exception propagates. `owner` (a flow
    run id) is what `stop_all` stops by. `log_file`: where its whole output is written
    (`flows.process.logfile`); a write that fails calls `warn` (default: `log`) once and
    never fails the attempt. `memory_limit` (MB): the tree is stopped the same way when its
    RSS at a sample is above it.
    """
    control = control or control_for("auto")
    started = time.monotonic()
    try:
        proc = control.spawn(argv, cwd=cwd, env=env, owner=owner)
    except OSError as exc:
        return _not_started(argv[0], exc, time.monotonic() - started)
    writer = None if log_file is None else AttemptLog(log_file, warn or log).open()
    output = AttemptOutput(log, max_log_lines, writer)
    assert proc.stdout is not None and proc.stderr is not None  # noqa: S101  (pipes requested)
    pipes = open_pipes({"stdout": proc.stdout, "stderr": proc.stderr})
    ending: Ending | None = None  # None until `_follow` returns: an exception ended it
    usage: TreeUsage | None = None
    try:
        ending, usage = _follow(
            proc, control, pipes, output, started + timeout, stall_timeout, memory_limit
        )
        over = usage.rss_mb if ending == "over_memory" and usage else None
        # One sample more: a pipeline that has just exited is still a zombie (the group
        # backend doesn't reap it yet), and its CPU time is final. Only the processes seen
        # so far: `stop` looks for new ones, and a pass over the process table costs.
        usage = control.usage(proc) or usage
    finally:
        _stop_and_close(proc, control, kill_grace, pipes, output, drained=ending == "exited")
    limit = {"timed_out": timeout, "stalled": stall_timeout, "over_memory": memory_limit}
    outcome = _outcome(
        proc.returncode, ending, limit.get(ending) or 0.0, time.monotonic() - started, output, over
    )
    outcome.peak_rss_mb, outcome.cpu_s = cost(usage, rusage.account(proc))
    return outcome


def _not_started(program: str, exc: OSError, duration: float) -> AttemptOutcome:
    return AttemptOutcome(
        status="not_started",
        exit_code=None,
        duration_s=duration,
        error=f"could not start {program!r}: {exc.strerror or exc}",
    )


def _stop_and_close(
    proc: subprocess.Popen[bytes],
    control: ProcessControl,
    kill_grace: float,
    pipes: Pipes,
    output: AttemptOutput,
    drained: bool,
) -> None:
    """Stop all the attempt started, then close its pipes and output. What is left in the
    pipes is read (`drained`) only after the pipeline exited, never after an exception (a
    CancelledError raised into this thread, say): raised just after a read of the reader
    threads' queue took the queue's lock (CPython checks for it after each C call), it left
    that lock held, and a drain then waited for it for ever (a red CI run: tree-threads, the
    thread never ended)."""
    control.stop(proc, kill_grace)
    if drained:
        drain(pipes, output, until=time.monotonic() + 0.5)
    pipes.close()
    output.close()


def cost(
    sampled: TreeUsage | None, counted: rusage.Account | None
) -> tuple[float | None, float | None]:
    """The attempt's (peak RSS MB, CPU seconds), never a figure that is only what a sample
    happened to see.

    CPU: where the kernel counted the reaped pipeline (POSIX), the larger of its figure and
    the samples' (the kernel's sees what lived between samples, the samples' what was never
    reaped); without it, the samples' on Windows (which keeps none) and None on POSIX.
    Peak: the larger of the kernel's, where it is the tree's own (`Account.peak_known`), and
    the samples' (the tree's RSS summed at a sample), where at least two samples found the
    tree alive; None when neither holds (a pipeline shorter than a sample, whose kernel
    figure is the spawning process's)."""
    if counted is None and rusage.supported():
        cpu = None
    elif counted is None:
        cpu = sampled.cpu_s if sampled else None
    else:
        cpu = max(counted.cpu_s, sampled.cpu_s if sampled else 0.0)
    peaks = [sampled.peak_rss_mb] if sampled and sampled.seen_alive >= 2 else []
    if counted is not None and counted.peak_known:
        peaks.append(counted.peak_rss_mb)
    return (max(peaks) if peaks else None), cpu


def _follow(
    proc: subprocess.Popen[bytes],
    control: ProcessControl,
    pipes: Pipes,
    output: AttemptOutput,
    deadline: float,
    stall_timeout: float | None,
    memory_limit: float | None = None,
) -> tuple[Ending, TreeUsage | None]:
    """Read the pipeline's output until it exits, `deadline` passes, it has printed
    nothing for `stall_timeout` seconds, or the tree's RSS is above `memory_limit` MB at a
    sample. The tree is watched (and sampled) every POLL_SECONDS, not at every read: a walk
    of the process table per chunk was most of a loud pipeline's cost. Returns how it ended
    and the tree's usage at the last sample."""
    next_watch = time.monotonic()
    nap = 0.005
    usage: TreeUsage | None = None
    while True:
        now = time.monotonic()
        remaining = deadline - now
        if remaining <= 0:
            return "timed_out", usage
        quiet_left = (
            remaining if stall_timeout is None else (output.last_output + stall_timeout - now)
        )
        if control.exited(proc):
            # The pipeline is gone; a grandchild may still hold the pipes open.
            drain(pipes, output, until=time.monotonic() + 0.5)
            return "exited", usage
        if quiet_left <= 0:  # after the exit check: a silent pipeline that just ended ended
            return "stalled", usage
        if now >= next_watch:
            usage = control.watch(proc) or usage
            next_watch = now + POLL_SECONDS
            if memory_limit is not None and usage is not None and usage.rss_mb > memory_limit:
                return "over_memory", usage
        wait = min(remaining, quiet_left, POLL_SECONDS)
        if pipes.open():
            for name, data in pipes.read(wait):
                output.feed(name, data)
        else:  # it closed stdout and stderr but runs on: wait for its end or the timeout
            # Short naps first: pipes closed is most often a pipeline that is exiting now.
            time.sleep(min(wait, nap))
            nap = min(nap * 2, POLL_SECONDS)


def _outcome(
    code: int | None,
    ending: Ending,
    limit: float,
    duration: float,
    output: AttemptOutput,
    over_mb: float | None = None,
) -> AttemptOutcome:
    """The attempt's outcome, from how it ended and what it printed."""
    common: dict[str, Any] = {
        "duration_s": duration,
        "result": output.result(),
        "stderr_tail": output.stderr_tail(),
        "lines_total": output.logged.total,
        "lines_not_logged": output.logged.dropped,
        "log_path": None,
        "log_complete": True,
        "ending": ending,
    }
    if output.log_file is not None:
        common["log_path"] = str(output.log_file.path) if output.log_file.created else None
        common["log_complete"] = output.log_file.complete
    if ending != "exited":
        seen = output.last_seen()
        last = clean(seen) if seen else None
        if ending == "timed_out":
            error = f"timed out after {limit:g} s" + (f": {last}" if last else "")
        elif ending == "over_memory":
            error = f"over memory: {round(over_mb or 0.0)} MB > {_number(limit)} MB"
        else:
            error = f"stalled: no output for {limit:g} s"
        return AttemptOutcome("timed_out", code, error=error, cause=last or None, **common)
    if code == 0:
        return AttemptOutcome(status="succeeded", exit_code=0, **common)
    assert code is not None  # noqa: S101  (control.stop waited for it)
    cause = cause_of(output.tail("stderr"), output.tail("stdout"), output.result_line())
    error = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
    if cause:
        error = f"{error}: {cause}"
    return AttemptOutcome("failed", code, error=error, cause=cause, **common)


def _number(value: float) -> str:
    """`500` for 500.0, `0.5` for 0.5: a limit as it was written, never in e-notation."""
    return str(int(value)) if float(value).is_integer() else str(value)


__all__ = [
    "MAX_LINE_BYTES",
    "STDERR_TAIL",
    "AttemptOutcome",
    "AttemptStatus",
    "BoundedLog",
    "run_attempt",
]
