"""Reading a pipeline's output: both pipes at once, split into lines, bounded in memory.

Plain Python. On POSIX both pipes are read in the calling thread with `selectors`, so an
attempt costs no extra threads; on Windows, where `select` takes sockets only, one reader
thread per pipe (`READER`). Lines longer than `MAX_LINE_BYTES` are cut, and `BoundedLog`
logs the first and last `max_log_lines` of them, so a 20 MB pipeline costs a bounded number
of log records.
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
from collections.abc import Callable, Mapping
from typing import IO, Any, Literal, Protocol

MAX_LINE_BYTES = 8192  # longer lines are cut; the rest of the line is dropped
POLL_SECONDS = 0.2  # how long one read waits at most
STDERR_TAIL = 10  # the last stderr lines kept for the report

LogFn = Callable[[str], None]


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


class LineSplitter:
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


class AttemptOutput:
    """One attempt's output as it comes: each pipe split into lines, logged (bounded), the
    last stderr lines and the last non-empty stdout line kept (the result)."""

    def __init__(self, log: LogFn, max_log_lines: int) -> None:
        self.logged = BoundedLog(log, max_log_lines)
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self._last_stdout: str | None = None
        self._splitters = {
            "stdout": LineSplitter(self._on_stdout),
            "stderr": LineSplitter(self._on_stderr),
        }

    def _on_stdout(self, line: str) -> None:
        if line.strip():
            self._last_stdout = line
        self.logged.add(line)

    def _on_stderr(self, line: str) -> None:
        self._stderr_tail.append(line)
        self.logged.add(f"[stderr] {line}")

    def feed(self, pipe: str, data: bytes) -> None:
        """Bytes read from `pipe` (`stdout` or `stderr`)."""
        self._splitters[pipe].feed(data)

    def close(self) -> None:
        """The end of both pipes: flush the last lines, then the log's kept tail."""
        for splitter in self._splitters.values():
            splitter.flush()
        self.logged.close()

    def result(self) -> dict[str, Any] | None:
        """The JSON object on the last non-empty stdout line, if it is one."""
        return parse_result(self._last_stdout)

    def stderr_tail(self) -> list[str]:
        return list(self._stderr_tail)


def parse_result(line: str | None) -> dict[str, Any] | None:
    """The JSON object on `line`, or None when it isn't one."""
    if not line or not line.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def drain(pipes: Pipes, output: AttemptOutput, until: float) -> None:
    """Read what is left in the pipes, for at most until - now seconds."""
    while pipes.open() and time.monotonic() < until:
        chunks = pipes.read(max(0.0, until - time.monotonic()))
        if not chunks:
            break
        for name, data in chunks:
            output.feed(name, data)


class Pipes(Protocol):
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
                        self._queue.put((name, data), timeout=POLL_SECONDS)
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


def open_pipes(streams: Mapping[str, IO[bytes]]) -> Pipes:
    return _ThreadPipes(streams) if READER == "threads" else _SelectorPipes(streams)
