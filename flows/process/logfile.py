"""Every attempt's full output on disk: where the files are, the writer, and pruning.

Plain Python. The files of one site live under its output folder::

    <site_dir>/logs/<flow_run_id>/attempt-<n>.log

`attempt_log_path` builds that path and refuses a flow run id that is not a UUID (so no
path leaves `site_dir`); `run_logs` lists one run's files in attempt order; `prune_logs`
keeps the newest `keep` runs' folders (by modification time; the current run's always).

The format (`AttemptLog`): the bytes the pipeline printed, in the order they were read,
unchanged (invalid UTF-8 included) except that every stderr line starts with
``[stderr] `` (stdout lines are as printed). Lines stay whole: a pipe's unfinished line
waits (up to `PENDING_BYTES`) for its end before it is written. A longer unfinished line is
written as it comes; if the other pipe speaks before it ends, a newline is added and the
rest goes on a line of its own. A last line without a newline gets one. Memory is constant:
each chunk is written as it is read.

A write that fails (a full disk: `OSError`, `ENOSPC`) never fails the attempt: `warn` is
called once, the file gets the line `[log incomplete: <reason>]` if it still can, nothing
more is written, and `complete` is False.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

PENDING_BYTES = 65536  # an unfinished line waits for its end up to this size
STDERR_MARK = b"[stderr] "
LOGS = "logs"

LogFn = Callable[[str], None]


def attempt_log_path(site_dir: Path, flow_run_id: str, attempt: int) -> Path:
    """`site_dir/logs/<flow_run_id>/attempt-<attempt>.log`. ValueError unless the flow run
    id is a UUID and the attempt a positive number: nothing else can make a path that
    leaves `site_dir`."""
    return _run_dir(site_dir, flow_run_id) / f"attempt-{_attempt_number(attempt)}.log"


def run_logs(site_dir: Path, flow_run_id: str) -> list[Path]:
    """The attempt logs of flow run `flow_run_id` that exist, in attempt order."""
    folder = _run_dir(site_dir, flow_run_id)
    found = []
    for path in folder.glob("attempt-*.log") if folder.is_dir() else ():
        number = path.stem.removeprefix("attempt-")
        if number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


def prune_logs(site_dir: Path, keep: int, current: str) -> None:
    """Delete the log folders of the older runs of this site: the newest `keep` (by
    modification time) stay, the current run's among them, whatever its time. Only
    folders named by a UUID are touched. OSError if one can't be deleted."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    current_dir = _run_dir(site_dir, current)
    root = site_dir / LOGS
    if not root.is_dir():
        return
    others = [p for p in root.iterdir() if p.is_dir() and _is_uuid(p.name) and p != current_dir]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[keep - 1 :]:
        shutil.rmtree(old)


def _run_dir(site_dir: Path, flow_run_id: str) -> Path:
    if not _is_uuid(flow_run_id):
        raise ValueError(f"not a flow run id (a UUID): {flow_run_id!r}")
    return site_dir / LOGS / str(uuid.UUID(flow_run_id))


def _attempt_number(attempt: int) -> int:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"not an attempt number: {attempt!r}")
    return attempt


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except (ValueError, TypeError, AttributeError):
        return False


class AttemptLog:
    """One attempt's log file, written chunk by chunk (the format is in the module
    docstring). `open()` creates its folder; a file that can't be opened or written is
    `complete = False`, and `warn` says so once."""

    def __init__(self, path: Path, warn: LogFn | None = None) -> None:
        self.path = path
        self.complete = True
        self.created = False  # the file exists (complete or not)
        self._warn = warn
        self._file: BinaryIO | None = None
        self._pending: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        self._mid_line: str | None = None  # the pipe whose line was written unfinished

    def open(self) -> AttemptLog:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("wb", buffering=1 << 16)
            self.created = True
        except OSError as exc:
            self._fail(exc, mark=False)
        return self

    def write(self, pipe: str, data: bytes) -> None:
        """`data` read from `pipe` (`stdout` or `stderr`)."""
        if self._file is None:
            return
        held = self._pending[pipe] + data if self._pending[pipe] else data
        end = held.rfind(b"\n") + 1
        if end == 0 and len(held) <= PENDING_BYTES:
            self._pending[pipe] = held
            return
        if end == 0:
            end = len(held)  # an over-long unfinished line: write it as it comes
        self._pending[pipe] = held[end:]
        self._put(pipe, held[:end])

    def close(self) -> None:
        """Write what is pending (each unfinished line gets its newline), then close."""
        for pipe, rest in self._pending.items():
            if rest and self._file is not None:
                self._put(pipe, rest + b"\n")
        self._pending = {"stdout": b"", "stderr": b""}
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._fail(exc)
            self._file = None

    def _put(self, pipe: str, block: bytes) -> None:
        """Write `block` (whole lines, unless an over-long line) of `pipe`, marked."""
        assert self._file is not None  # noqa: S101  (checked by the callers)
        lead = b""
        if self._mid_line is not None and self._mid_line != pipe:
            lead = b"\n"  # the other pipe's unfinished line ends here
            self._mid_line = None
        if pipe == "stderr":
            starts_line = self._mid_line != pipe
            block = block.replace(b"\n", b"\n" + STDERR_MARK)
            if block.endswith(b"\n" + STDERR_MARK):
                block = block[: -len(STDERR_MARK)]
            if starts_line:
                block = STDERR_MARK + block
        self._mid_line = None if block.endswith(b"\n") else pipe
        try:
            self._file.write(lead + block)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError, mark: bool = True) -> None:
        """Stop writing for good, say so once, and mark the file if it still takes it."""
        reason = exc.strerror or str(exc)
        handle, self._file = self._file, None
        if handle is not None:
            with contextlib.suppress(OSError):
                if mark:
                    handle.write(f"\n[log incomplete: {reason}]\n".encode())
            with contextlib.suppress(OSError):
                handle.close()
        if self.complete and self._warn is not None:
            self._warn(f"the attempt's log {self.path} is incomplete: {reason}; writing stopped")
        self.complete = False


__all__ = [
    "PENDING_BYTES",
    "STDERR_MARK",
    "AttemptLog",
    "attempt_log_path",
    "prune_logs",
    "run_logs",
]
