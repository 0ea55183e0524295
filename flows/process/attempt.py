"""Run one attempt of one site's pipeline as a real process, with a real timeout.

Plain Python: the caller passes a `log` callable (the Prefect task run logger
in production, a list's `append` in tests). The output is read as it comes
(`flows.process.output`), in bounded memory however much the pipeline prints; the
process tree is started, watched and stopped by a `ProcessControl` backend.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flows.process.control import ProcessControl, control_for
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

AttemptStatus = Literal["succeeded", "failed", "timed_out", "not_started"]


@dataclass
class AttemptOutcome:
    """What one attempt did. `result` is the JSON object of the last stdout line, if any."""

    status: AttemptStatus
    exit_code: int | None
    duration_s: float
    error: str | None = None
    result: dict[str, Any] | None = None
    stderr_tail: list[str] = field(default_factory=list)
    lines_total: int = 0
    lines_not_logged: int = 0


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
) -> AttemptOutcome:
    """Run `argv` once and wait for it, at most `timeout` seconds.

    `control` (default: this platform's, `flows.process.control`) starts it as a process
    group or a tracked tree. On timeout everything it started is asked to end, then killed
    after `kill_grace`. When the pipeline exits, anything it left running is stopped too.
    If this call is interrupted (an exception raised into the thread), its processes are
    stopped before the exception propagates. `owner` (a flow run id) is what
    `stop_all` stops by.
    """
    control = control or control_for("auto")
    started = time.monotonic()
    try:
        proc = control.spawn(argv, cwd=cwd, env=env, owner=owner)
    except OSError as exc:
        return AttemptOutcome(
            status="not_started",
            exit_code=None,
            duration_s=time.monotonic() - started,
            error=f"could not start {argv[0]!r}: {exc.strerror or exc}",
        )
    output = AttemptOutput(log, max_log_lines)
    assert proc.stdout is not None and proc.stderr is not None  # noqa: S101  (pipes requested)
    pipes = open_pipes({"stdout": proc.stdout, "stderr": proc.stderr})
    timed_out = False
    try:
        timed_out = _follow(proc, control, pipes, output, deadline=started + timeout)
    finally:
        control.stop(proc, kill_grace)
        if not timed_out:
            drain(pipes, output, until=time.monotonic() + 0.5)
        pipes.close()
        output.close()
    return _outcome(proc.returncode, timed_out, timeout, time.monotonic() - started, output)


def _follow(
    proc: subprocess.Popen[bytes],
    control: ProcessControl,
    pipes: Pipes,
    output: AttemptOutput,
    deadline: float,
) -> bool:
    """Read the pipeline's output until it exits (False) or `deadline` passes (True)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        if control.exited(proc):
            # The pipeline is gone; a grandchild may still hold the pipes open.
            drain(pipes, output, until=time.monotonic() + 0.5)
            return False
        control.watch(proc)
        if pipes.open():
            for name, data in pipes.read(min(remaining, POLL_SECONDS)):
                output.feed(name, data)
        else:  # it closed stdout and stderr but runs on: wait for its end or the timeout
            time.sleep(min(remaining, POLL_SECONDS))


def _outcome(
    code: int | None, timed_out: bool, timeout: float, duration: float, output: AttemptOutput
) -> AttemptOutcome:
    """The attempt's outcome, from how it ended and what it printed."""
    common: dict[str, Any] = {
        "duration_s": duration,
        "result": output.result(),
        "stderr_tail": output.stderr_tail(),
        "lines_total": output.logged.total,
        "lines_not_logged": output.logged.dropped,
    }
    if timed_out:
        return AttemptOutcome(
            status="timed_out",
            exit_code=code,
            error=f"timed out after {timeout:g}s; process group stopped",
            **common,
        )
    if code == 0:
        return AttemptOutcome(status="succeeded", exit_code=0, **common)
    assert code is not None  # noqa: S101  (control.stop waited for it)
    error = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
    return AttemptOutcome(status="failed", exit_code=code, error=error, **common)


__all__ = [
    "MAX_LINE_BYTES",
    "STDERR_TAIL",
    "AttemptOutcome",
    "AttemptStatus",
    "BoundedLog",
    "run_attempt",
]
