"""Run one attempt of one site's pipeline as a real process, with a real timeout.

Plain Python: the caller passes a `log` callable (the Prefect task run logger
in production, a list's `append` in tests). On POSIX, output is read in the
calling thread with `selectors`, so an attempt costs no extra threads; on
Windows, where `select` takes sockets only, one reader thread per pipe. Memory
and log volume stay bounded however much the pipeline prints.
"""

from __future__ import annotations

import json
import os
import queue
import selectors
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal, Protocol

from flows.process.control import ProcessControl, control_for

MAX_LINE_BYTES = 8192  # longer lines are cut; the rest of the line is dropped
STDERR_TAIL = 10
_POLL_SECONDS = 0.2  # also how soon Prefect's backstop timeout can interrupt us

AttemptStatus = Literal["succeeded", "failed", "timed_out", "not_started"]
LogFn = Callable[[str], None]


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


class BoundedLog:
    """Log the first `limit` lines as they come, then keep only the last `limit`.

    `close()` logs how many lines were left out, then the kept tail, so a 20 MB
    pipeline costs at most about 2 * limit log records.
    """

    def __init__(self, log: LogFn, limit: int) -> None:
        self._log = log
        self._limit = limit
        self.total = 0
        self._tail: deque[str] = deque(maxlen=limit)
        self.dropped = 0

    def add(self, line: str) -> None:
        self.total += 1
        if self.total <= self._limit:
            self._log(line)
            return
        if len(self._tail) == self._limit:
            self.dropped += 1
        self._tail.append(line)

    def close(self) -> None:
        if self.dropped:
            self._log(
                f"... {self.dropped} output lines not logged (only the first and last "
                f"{self._limit} are kept) ..."
            )
        for line in self._tail:
            self._log(line)
        self._tail.clear()


class _LineSplitter:
    """Split a byte stream into text lines, cutting lines longer than MAX_LINE_BYTES."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._buffer = bytearray()
        self._skipping = False  # inside the dropped rest of an over-long line

    def feed(self, data: bytes) -> None:
        start = 0
        while True:
            newline = data.find(b"\n", start)
            if newline < 0:
                break
            self._push(data[start:newline], complete=True)
            start = newline + 1
        self._push(data[start:], complete=False)

    def _push(self, chunk: bytes, complete: bool) -> None:
        if not self._skipping:
            room = MAX_LINE_BYTES - len(self._buffer)
            self._buffer += chunk[:room]
            if len(chunk) > room:
                self._emit(self._decode() + " [line cut]")
                self._skipping = True
        if complete:
            if not self._skipping:
                self._emit(self._decode())
            self._skipping = False

    def _decode(self) -> str:
        text = self._buffer.decode("utf-8", errors="replace").rstrip("\r")
        self._buffer.clear()
        return text

    def flush(self) -> None:
        if self._buffer and not self._skipping:
            self._emit(self._decode())
        self._buffer.clear()


def parse_result(line: str | None) -> dict[str, Any] | None:
    """The JSON object on `line`, or None when it isn't one."""
    if not line or not line.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


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

    logged = BoundedLog(log, max_log_lines)
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
    last_stdout: list[str] = []

    def on_stdout(line: str) -> None:
        if line.strip():
            last_stdout[:] = [line]
        logged.add(line)

    def on_stderr(line: str) -> None:
        stderr_tail.append(line)
        logged.add(f"[stderr] {line}")

    splitters = {"stdout": _LineSplitter(on_stdout), "stderr": _LineSplitter(on_stderr)}
    assert proc.stdout is not None and proc.stderr is not None  # noqa: S101  (pipes requested)
    pipes = _open_pipes({"stdout": proc.stdout, "stderr": proc.stderr})
    deadline = started + timeout
    timed_out = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if control.exited(proc):
                # The pipeline is gone; a grandchild may still hold the pipes open.
                _drain(pipes, splitters, until=time.monotonic() + 0.5)
                break
            control.watch(proc)
            if pipes.open():
                for name, data in pipes.read(min(remaining, _POLL_SECONDS)):
                    splitters[name].feed(data)
            else:  # it closed stdout and stderr but runs on: wait for its end or the timeout
                time.sleep(min(remaining, _POLL_SECONDS))
    finally:
        control.stop(proc, kill_grace)
        if not timed_out:
            _drain(pipes, splitters, until=time.monotonic() + 0.5)
        pipes.close()
        for splitter in splitters.values():
            splitter.flush()
        logged.close()

    duration = time.monotonic() - started
    common: dict[str, Any] = {
        "duration_s": duration,
        "result": parse_result(last_stdout[0] if last_stdout else None),
        "stderr_tail": list(stderr_tail),
        "lines_total": logged.total,
        "lines_not_logged": logged.dropped,
    }
    if timed_out:
        return AttemptOutcome(
            status="timed_out",
            exit_code=proc.returncode,
            error=f"timed out after {timeout:g}s; process group stopped",
            **common,
        )
    code = proc.returncode
    if code == 0:
        return AttemptOutcome(status="succeeded", exit_code=0, **common)
    error = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
    return AttemptOutcome(status="failed", exit_code=code, error=error, **common)


def _drain(pipes: _Pipes, splitters: Mapping[str, _LineSplitter], until: float) -> None:
    """Read what is left in the pipes, for at most until - now seconds."""
    while pipes.open() and time.monotonic() < until:
        chunks = pipes.read(max(0.0, until - time.monotonic()))
        if not chunks:
            break
        for name, data in chunks:
            splitters[name].feed(data)


class _Pipes(Protocol):
    """The pipeline's stdout and stderr, read without blocking on either."""

    def open(self) -> bool:
        """True while a pipe has not reached its end."""
        ...

    def read(self, timeout: float) -> list[tuple[str, bytes]]:
        """(pipe, data) read within `timeout` seconds; a pipe at its end is closed."""
        ...

    def close(self) -> None:
        """Stop reading and close both pipes (now, or once nothing blocks on them)."""
        ...


class _SelectorPipes:
    """POSIX: one `select` over both pipes, in the calling thread (no extra threads)."""

    def __init__(self, streams: Mapping[str, IO[bytes]]) -> None:
        self._streams = list(streams.values())
        self._selector = selectors.DefaultSelector()
        for name, stream in streams.items():
            self._selector.register(stream, selectors.EVENT_READ, name)

    def open(self) -> bool:
        return bool(self._selector.get_map())

    def read(self, timeout: float) -> list[tuple[str, bytes]]:
        chunks = []
        for key, _ in self._selector.select(timeout):
            data = os.read(key.fd, 65536)
            if data:
                chunks.append((str(key.data), data))
            else:
                self._selector.unregister(key.fileobj)
        return chunks

    def close(self) -> None:
        self._selector.close()
        for stream in self._streams:
            stream.close()


class _ThreadPipes:
    """Windows, where `select` takes sockets only: one reader thread per pipe."""

    def __init__(self, streams: Mapping[str, IO[bytes]]) -> None:
        # Bounded: a pipeline that writes faster than we read waits (about 4 MB in flight).
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=64)
        self._open = set(streams)
        self._closed = threading.Event()
        for name, stream in streams.items():
            threading.Thread(
                target=self._pump, args=(name, stream), name=f"pipe-{name}", daemon=True
            ).start()

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        """Read `stream` to its end, then close it. Only this thread closes it: closing a
        buffered pipe while another thread reads it waits for that read, which lasts as
        long as a process that escaped the stop holds the pipe."""
        try:
            data = b"x"
            while data:
                try:
                    data = stream.read1(65536)  # type: ignore[attr-defined]
                except (OSError, ValueError):
                    data = b""
                while not self._closed.is_set():  # once closed, what comes is dropped
                    try:
                        self._queue.put((name, data), timeout=_POLL_SECONDS)
                        break
                    except queue.Full:
                        continue
        finally:
            stream.close()

    def open(self) -> bool:
        return bool(self._open)

    def read(self, timeout: float) -> list[tuple[str, bytes]]:
        try:
            items = [self._queue.get(timeout=max(timeout, 0.001))]
        except queue.Empty:
            return []
        for _ in range(self._queue.maxsize):  # what is queued now, not what keeps coming
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for name, data in items:
            if not data:
                self._open.discard(name)
        return [(name, data) for name, data in items if data]

    def close(self) -> None:
        self._closed.set()  # each thread closes its pipe at the pipe's end


READER: Literal["select", "threads"] = "threads" if sys.platform == "win32" else "select"


def _open_pipes(streams: Mapping[str, IO[bytes]]) -> _Pipes:
    return _ThreadPipes(streams) if READER == "threads" else _SelectorPipes(streams)
