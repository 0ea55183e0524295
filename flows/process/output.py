"""Reading a pipeline's output: both pipes at once, split into lines, bounded in memory.

Plain Python. On POSIX both pipes are read in the calling thread with `selectors`, so an
attempt costs no extra threads; on Windows, where `select` takes sockets only, one reader
thread per pipe (`READER`). Lines longer than `MAX_LINE_BYTES` are cut, and `BoundedLog`
logs the first and last `max_log_lines` of them, so a 20 MB pipeline costs a bounded number
of log records. The full output goes to the attempt's log file (`flows.process.logfile`),
chunk by chunk.

Speed: the work is per chunk, not per line. Reads take up to `READ_BYTES`, and on Linux
each pipe is widened to `PIPE_BYTES`, so a loud pipeline rarely waits on a full pipe. A
chunk is split with `bytes.split` (in C); only the lines that are logged live, or kept at
the end (the log's tail, the last `CAUSE_LINES` of each pipe, the last stdout line) are
ever decoded, and those once, at the end.
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

from flows.process.cause import CAUSE_LINES
from flows.process.logfile import AttemptLog

MAX_LINE_BYTES = 8192  # longer lines are cut; the rest of the line is dropped
POLL_SECONDS = 0.2  # how long one read waits at most
STDERR_TAIL = 10  # the last stderr lines kept for the report
READ_BYTES = 1 << 20  # one read takes at most this much
PIPE_BYTES = 1 << 18  # Linux: each pipe's buffer (F_SETPIPE_SZ), 4x the default
CUT_MARK = b" [line cut]"

LogFn = Callable[[str], None]


def decode(line: bytes) -> str:
    """One line's text: invalid UTF-8 becomes U+FFFD, a CRLF's `\r` goes."""
    return line.decode("utf-8", errors="replace").rstrip("\r")


class BoundedLog:
    """Log the first `limit` lines as they come, then keep only the last `limit`.

    `close()` logs how many lines were left out, then the kept tail, so a 20 MB
    pipeline costs at most about 2 * limit log records. The tail is kept as raw lines in
    blocks (one per chunk) and decoded at `close()` only.
    """

    def __init__(self, log: LogFn, limit: int) -> None:
        self._log = log
        self._limit = limit
        self.total = 0
        self._blocks: deque[tuple[str, list[bytes]]] = deque()
        self._kept = 0

    @property
    def dropped(self) -> int:
        """Lines neither logged live nor kept for the end."""
        return self.total - min(self.total, self._limit) - self._kept

    def add(self, line: str) -> None:
        self.add_lines([line.encode("utf-8", errors="replace")])

    def add_lines(self, lines: list[bytes], prefix: str = "") -> None:
        """Whole lines of one pipe, in order; each is logged as `prefix` + its text."""
        live = max(0, min(len(lines), self._limit - self.total))
        for line in lines[:live]:
            self._log(prefix + decode(line))
        self.total += len(lines)
        rest = lines[live:][-self._limit :] if self._limit else []
        if not rest:
            return
        self._blocks.append((prefix, rest))
        self._kept += len(rest)
        excess = self._kept - self._limit
        while excess > 0:
            first_prefix, first = self._blocks[0]
            if len(first) <= excess:
                self._blocks.popleft()
                taken = len(first)
            else:
                self._blocks[0] = (first_prefix, first[excess:])
                taken = excess
            self._kept -= taken
            excess -= taken

    def close(self) -> None:
        if self.dropped:
            self._log(
                f"... {self.dropped} output lines not logged (only the first and last "
                f"{self._limit} are kept) ..."
            )
        for prefix, lines in self._blocks:
            for line in lines:
                self._log(prefix + decode(line))
        self._blocks.clear()  # `_kept` stays: `dropped` still counts right


class ChunkSplitter:
    """Split a byte stream into whole lines (bytes, `\n` removed), cutting lines longer
    than MAX_LINE_BYTES to that many bytes plus CUT_MARK; the rest of such a line is dropped.
    The work is per chunk: `bytes.split` does the splitting."""

    def __init__(self) -> None:
        self._buffer = b""  # the unfinished line, at most MAX_LINE_BYTES
        self._skipping = False  # inside the dropped rest of an over-long line

    def feed(self, data: bytes) -> list[bytes]:
        """The lines that `data` finishes, in order."""
        parts = data.split(b"\n")
        rest = parts.pop()
        if parts:
            if self._skipping:
                del parts[0]
                self._skipping = False
            elif self._buffer:
                parts[0] = self._buffer + parts[0]
            self._buffer = b""
            if parts and max(map(len, parts)) > MAX_LINE_BYTES:
                parts = [_cut(part) for part in parts]
        if rest and not self._skipping:
            room = MAX_LINE_BYTES - len(self._buffer)
            if len(rest) > room:
                parts.append(self._buffer + rest[:room] + CUT_MARK)
                self._buffer = b""
                self._skipping = True
            else:
                self._buffer += rest
        return parts

    def flush(self) -> list[bytes]:
        """The last line, if the stream ended without a newline."""
        last = [self._buffer] if self._buffer and not self._skipping else []
        self._buffer = b""
        return last


def _cut(line: bytes) -> bytes:
    return line if len(line) <= MAX_LINE_BYTES else line[:MAX_LINE_BYTES] + CUT_MARK


class AttemptOutput:
    """One attempt's output as it comes: each pipe split into lines, logged (bounded) and
    written whole to `log_file` (if given); kept for the end: the last `CAUSE_LINES` lines
    of each pipe, the last non-empty stdout line (the result) and the last non-empty line
    of either pipe (`last_seen`). `last_output` is when the last bytes came (monotonic)."""

    def __init__(self, log: LogFn, max_log_lines: int, log_file: AttemptLog | None = None) -> None:
        self.logged = BoundedLog(log, max_log_lines)
        self.log_file = log_file
        self.last_output = time.monotonic()
        self._tails: dict[str, deque[bytes]] = {
            "stdout": deque(maxlen=CAUSE_LINES),
            "stderr": deque(maxlen=CAUSE_LINES),
        }
        self._last_stdout: bytes | None = None
        self._last_seen: bytes | None = None
        self._splitters = {"stdout": ChunkSplitter(), "stderr": ChunkSplitter()}

    def feed(self, pipe: str, data: bytes) -> None:
        """Bytes read from `pipe` (`stdout` or `stderr`)."""
        self.last_output = time.monotonic()
        if self.log_file is not None:
            self.log_file.write(pipe, data)
        self._take(pipe, self._splitters[pipe].feed(data))

    def _take(self, pipe: str, lines: list[bytes]) -> None:
        if not lines:
            return
        self.logged.add_lines(lines, "[stderr] " if pipe == "stderr" else "")
        self._tails[pipe].extend(lines[-CAUSE_LINES:])
        for line in reversed(lines):  # the last non-empty one: nearly always the last
            if line.strip():
                self._last_seen = line
                if pipe == "stdout":
                    self._last_stdout = line
                break

    def close(self) -> None:
        """The end of both pipes: flush the last lines, then the log's kept tail."""
        for pipe, splitter in self._splitters.items():
            self._take(pipe, splitter.flush())
        self.logged.close()
        if self.log_file is not None:
            self.log_file.close()

    def result(self) -> dict[str, Any] | None:
        """The JSON object on the last non-empty stdout line, if it is one."""
        return parse_result(self.result_line())

    def result_line(self) -> str | None:
        return None if self._last_stdout is None else decode(self._last_stdout)

    def stderr_tail(self) -> list[str]:
        return [decode(line) for line in list(self._tails["stderr"])[-STDERR_TAIL:]]

    def tail(self, pipe: str) -> list[str]:
        """The last `CAUSE_LINES` lines of `pipe`, as text."""
        return [decode(line) for line in self._tails[pipe]]

    def last_seen(self) -> str | None:
        """The last non-empty line of either pipe, as text."""
        return None if self._last_seen is None else decode(self._last_seen)


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
            widen_pipe(stream.fileno())
            self._selector.register(stream, selectors.EVENT_READ, name)

    def open(self) -> bool:
        return bool(self._selector.get_map())

    def read(self, timeout: float) -> list[tuple[str, bytes]]:
        chunks = []
        for key, _ in self._selector.select(timeout):
            data = os.read(key.fd, READ_BYTES)
            if data:
                chunks.append((str(key.data), data))
            else:
                self._selector.unregister(key.fileobj)
        return chunks

    def close(self) -> None:
        self._selector.close()
        for stream in self._streams:
            stream.close()


def widen_pipe(fd: int) -> None:
    """Linux: give the pipe a `PIPE_BYTES` buffer, so a loud pipeline waits less on us.
    Elsewhere, or where the limit (/proc/sys/fs/pipe-max-size) is lower, nothing changes."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)  # type: ignore[attr-defined,unused-ignore]
    except (ImportError, AttributeError, OSError):
        pass


class _ThreadPipes:
    """Windows, where `select` takes sockets only: one reader thread per pipe."""

    def __init__(self, streams: Mapping[str, IO[bytes]]) -> None:
        # Bounded: a pipeline that writes faster than we read waits (about 4 MB in flight).
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(
            maxsize=64  # pragma: no mutate: only bounds memory, 65 behaves the same
        )
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
            data = b"x"  # pragma: no mutate: a sentinel, only its truth is read
            while data:
                try:
                    data = stream.read1(  # type: ignore[attr-defined]
                        65536  # pragma: no mutate: a chunk size, 65537 reads the same bytes
                    )
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
