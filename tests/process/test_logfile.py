"""Every attempt's full log on disk: its path, its format, pruning, a full disk, and a loud
real pipeline whose every line is found in its file."""

from __future__ import annotations

import errno
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from flows.process.attempt import run_attempt
from flows.process.logfile import (
    PENDING_BYTES,
    AttemptLog,
    attempt_log_path,
    prune_logs,
    run_logs,
)

CAUSE_FAKE = Path(__file__).resolve().parents[1] / "support" / "fakes" / "cause_pipeline.py"
# A fixed id: test ids built from it are the same in every pytest-xdist worker.
RUN = "6f1c2b9e-3d4a-4e5f-8a7b-9c0d1e2f3a4b"


def written(*chunks: tuple[str, bytes], path: Path) -> bytes:
    log = AttemptLog(path).open()
    for pipe, data in chunks:
        log.write(pipe, data)
    log.close()
    return path.read_bytes()


# -- Where the files are -------------------------------------------------------------------


def test_the_path_is_under_the_site_folder_by_run_and_attempt(tmp_path: Path) -> None:
    """`<site_dir>/logs/<flow run id>/attempt-<n>.log`, the id as a canonical UUID."""
    assert attempt_log_path(tmp_path, RUN, 2) == tmp_path / "logs" / RUN / "attempt-2.log"
    upper = RUN.upper()
    assert attempt_log_path(tmp_path, upper, 1).parent.name == RUN


@pytest.mark.parametrize("run_id", ["../../etc", "..", "", "/abs", f"{RUN}/../x", "not-a-uuid"])
def test_a_flow_run_id_that_is_not_a_uuid_is_refused(tmp_path: Path, run_id: str) -> None:
    """Anything but a UUID as the run id is a ValueError: no path can leave site_dir."""
    with pytest.raises(ValueError, match="not a flow run id"):
        attempt_log_path(tmp_path, run_id, 1)


@pytest.mark.parametrize("attempt", [0, -1, True])
def test_an_attempt_number_below_one_is_refused(tmp_path: Path, attempt: int) -> None:
    """Attempts count from 1; 0, negatives and booleans are a ValueError."""
    with pytest.raises(ValueError, match="not an attempt number"):
        attempt_log_path(tmp_path, RUN, attempt)


def test_run_logs_lists_this_runs_attempts_in_number_order(tmp_path: Path) -> None:
    """attempt-10 comes after attempt-2 (numbers, not text); other files and other runs'
    logs are not listed; a run with no folder has no logs."""
    for n in (10, 2, 1):
        path = attempt_log_path(tmp_path, RUN, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (attempt_log_path(tmp_path, RUN, 1).parent / "attempt-x.log").write_text("?")
    other = attempt_log_path(tmp_path, str(uuid.uuid4()), 3)
    other.parent.mkdir(parents=True)
    other.write_text("x")
    assert [p.name for p in run_logs(tmp_path, RUN)] == [
        "attempt-1.log",
        "attempt-2.log",
        "attempt-10.log",
    ]
    assert run_logs(tmp_path, str(uuid.uuid4())) == []


def test_prune_keeps_the_newest_runs_and_always_the_current_one(tmp_path: Path) -> None:
    """With keep=3: the current run (even the oldest, even with no folder yet) and the two
    newest others stay; older runs' folders go; what is not a run folder stays."""
    runs = [str(uuid.uuid4()) for _ in range(5)]
    now = time.time()
    for age, run in enumerate(runs):  # runs[0] is the newest
        folder = attempt_log_path(tmp_path, run, 1).parent
        folder.mkdir(parents=True)
        (folder / "attempt-1.log").write_text(run)
        os.utime(folder, (now - 100 * age, now - 100 * age))
    (tmp_path / "logs" / "notes").mkdir()
    prune_logs(tmp_path, keep=3, current=runs[4])
    left = {p.name for p in (tmp_path / "logs").iterdir()}
    assert left == {runs[0], runs[1], runs[4], "notes"}
    prune_logs(tmp_path, keep=1, current=str(uuid.uuid4()))  # a new run: no folder yet
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {"notes"}


def test_prune_without_logs_does_nothing_and_keep_must_be_positive(tmp_path: Path) -> None:
    """A site that never logged: nothing happens. keep < 1 is a ValueError."""
    prune_logs(tmp_path, keep=14, current=RUN)
    with pytest.raises(ValueError, match="keep"):
        prune_logs(tmp_path, keep=0, current=RUN)


# -- The format -----------------------------------------------------------------------------


def test_stderr_lines_are_marked_and_both_pipes_stay_in_order(tmp_path: Path) -> None:
    """stdout lines as printed, every stderr line starts `[stderr] `, in the order read."""
    data = written(
        ("stdout", b"a\nb\n"),
        ("stderr", b"e1\ne2\n"),
        ("stdout", b"c\n"),
        path=tmp_path / "a.log",
    )
    assert data == b"a\nb\n[stderr] e1\n[stderr] e2\nc\n"


def test_an_unfinished_line_waits_for_its_end_so_lines_stay_whole(tmp_path: Path) -> None:
    """A line split over two reads, with the other pipe speaking in between, is one line;
    a last line without a newline gets one; bytes that are not UTF-8 are kept as they are."""
    data = written(
        ("stdout", b"hal"),
        ("stderr", b"warn\n"),
        ("stdout", b"f\xff\nno newline"),
        path=tmp_path / "b.log",
    )
    assert data == b"[stderr] warn\nhalf\xff\nno newline\n"


def test_an_over_long_unfinished_line_is_written_as_it_comes(tmp_path: Path) -> None:
    """Past PENDING_BYTES an unfinished line is written at once (memory stays constant);
    when the other pipe then speaks, a newline ends it there, and its rest is a new line."""
    big = b"y" * (PENDING_BYTES + 1)
    data = written(
        ("stderr", big),
        ("stdout", b"out\n"),
        ("stderr", b"tail\n"),
        path=tmp_path / "c.log",
    )
    assert data == b"[stderr] " + big + b"\nout\n[stderr] tail\n"


class FullDisk:
    """A file whose writes fail after `room` bytes, like a disk that fills up."""

    def __init__(self, room: int) -> None:
        self.room, self.data, self.closed = room, b"", False

    def write(self, data: bytes) -> int:
        if len(self.data) + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.data += data
        return len(data)

    def close(self) -> None:
        self.closed = True


def test_a_full_disk_warns_once_marks_the_log_and_stops_writing(tmp_path: Path) -> None:
    """The first failed write: one warning naming the file and the reason, the file is
    closed, `complete` is False, and later writes do nothing (no second warning)."""
    warnings: list[str] = []
    log = AttemptLog(tmp_path / "d.log", warnings.append).open()
    disk = FullDisk(room=10)
    log._file = disk  # type: ignore[assignment]
    log.write("stdout", b"fits\n")
    log.write("stdout", b"does not fit\n")
    log.write("stderr", b"nor this\n")
    log.close()
    assert log.complete is False and disk.closed
    assert disk.data == b"fits\n"
    assert len(warnings) == 1
    assert "d.log is incomplete: No space left on device" in warnings[0]


@pytest.mark.parametrize(
    ("error", "reason"),
    [(OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
     (OSError("quota exceeded"), "quota exceeded")],
)  # fmt: skip
def test_a_failed_write_marks_the_log_when_it_still_can_without_a_warn(
    tmp_path: Path, error: OSError, reason: str
) -> None:
    """A write too big for what is left, the mark still fits: the file ends with
    `[log incomplete: <reason>]` (the error's text when it has no strerror); with no `warn`
    given, nothing is raised."""
    mark = f"\n[log incomplete: {reason}]\n".encode()

    class Disk(FullDisk):
        def write(self, data: bytes) -> int:
            if len(self.data) + len(data) > self.room:
                raise error
            return super().write(data)

    log = AttemptLog(tmp_path / "d.log").open()
    disk = Disk(room=len(b"fits\n" + mark))
    log._file = disk  # type: ignore[assignment]
    log.write("stdout", b"fits\n")
    log.write("stdout", b"x" * 100 + b"\n")
    log.close()
    assert (log.complete, disk.closed, disk.data) == (False, True, b"fits\n" + mark)


def test_a_log_that_can_not_be_created_is_incomplete_not_an_error(tmp_path: Path) -> None:
    """A folder that can't be made (a file is in the way): a warning, no file, no raise."""
    (tmp_path / "blocker").write_text("")
    warnings: list[str] = []
    log = AttemptLog(tmp_path / "blocker" / "x" / "a.log", warnings.append).open()
    log.write("stdout", b"x\n")
    log.close()
    assert (log.complete, log.created, len(warnings)) == (False, False, 1)


# -- Real pipelines -------------------------------------------------------------------------


@pytest.mark.parametrize("own_warn", [True, False])
def test_an_attempt_whose_log_can_not_be_created_succeeds_and_names_no_log(
    tmp_path: Path, own_warn: bool
) -> None:
    """A log folder that can't be made: the attempt still succeeds, its outcome names no log
    file and says the log is incomplete; the one warning goes to `warn`, or to `log` when no
    `warn` is given."""
    (tmp_path / "blocker").write_text("")
    live: list[str] = []
    warnings: list[str] = []
    outcome = run_attempt(
        [sys.executable, "-c", 'import json; print(json.dumps({"ok": 1}))'],
        cwd=tmp_path, env=os.environ, timeout=60, kill_grace=1, log=live.append,
        log_file=tmp_path / "blocker" / "x" / "a.log",
        warn=warnings.append if own_warn else None,
    )  # fmt: skip
    assert outcome.status == "succeeded" and outcome.result == {"ok": 1}
    assert (outcome.log_path, outcome.log_complete) == (None, False)
    warned = [line for line in (warnings if own_warn else live) if "a.log" in line]
    assert len(warned) == 1 and "is incomplete" in warned[0]
    assert not [line for line in (live if own_warn else warnings) if "a.log" in line]


def test_a_loud_pipeline_has_every_line_of_both_pipes_in_its_log(tmp_path: Path) -> None:
    """5,000 numbered lines on each pipe: the live log keeps only its bounded part, the log
    file has every one of the 10,000 lines (stderr marked) and the result, each pipe's
    lines in their order, and the outcome names the file as complete."""
    log_file = attempt_log_path(tmp_path / "site", RUN, 1)
    live: list[str] = []
    outcome = run_attempt(
        [sys.executable, str(CAUSE_FAKE), "--site", "loudboth-a"],
        cwd=tmp_path, env=os.environ, timeout=60, kill_grace=1, log=live.append,
        max_log_lines=20, log_file=log_file,
    )  # fmt: skip
    assert outcome.status == "succeeded"
    assert (outcome.log_path, outcome.log_complete) == (str(log_file), True)
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert [x for x in lines if x.startswith("out ")] == [f"out {n}" for n in range(5000)]
    errs = [f"[stderr] err {n}" for n in range(5000)]
    assert [x for x in lines if x.startswith("[stderr] err ")] == errs
    assert '{"site": "loudboth-a", "attempt": 1}' in lines
    assert len(live) <= 2 * 20 + 1 and outcome.lines_total == 10_002


def test_a_full_disk_does_not_fail_the_attempt(tmp_path: Path) -> None:
    """The log file is /dev/full (every write: ENOSPC): the attempt still succeeds with its
    result, one warning says the log is incomplete, and the outcome says so too."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    warnings: list[str] = []
    outcome = run_attempt(
        [sys.executable, str(CAUSE_FAKE), "--site", "loudboth-a"],
        cwd=tmp_path, env=os.environ, timeout=60, kill_grace=1, log=lambda _: None,
        log_file=Path("/dev/full"), warn=warnings.append,
    )  # fmt: skip
    assert outcome.status == "succeeded" and outcome.result is not None
    assert outcome.log_complete is False
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
