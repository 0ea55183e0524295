"""How the runner turns a pipeline's bytes into log lines and its result: plain Python and
real pipes, no processes (tests/process/test_attempt.py runs real ones)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.process import output
from flows.process.cause import CAUSE_LINES
from flows.process.output import (
    MAX_LINE_BYTES,
    PIPE_BYTES,
    STDERR_TAIL,
    AttemptOutput,
    BoundedLog,
    ChunkSplitter,
    decode,
    parse_result,
)
from tests.support.waiting import wait_for


def split(*chunks: bytes) -> list[str]:
    """The text lines of `chunks`, as the runner reads them: split, then decoded."""
    splitter = ChunkSplitter()
    lines = [line for chunk in chunks for line in splitter.feed(chunk)] + splitter.flush()
    return [decode(line) for line in lines]


def test_lines_across_chunks_crlf_and_a_last_line_without_newline() -> None:
    """A line split over chunks is one line; CRLF ends a line like LF (only the \\r goes:
    trailing spaces and X's stay); a last line with no newline is still a line."""
    assert split(b"ab", b"c\r\nd  \r\n", b"eX\r\nlast") == ["abc", "d  ", "eX", "last"]


def test_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    """Invalid UTF-8 never raises: each bad byte is U+FFFD; valid UTF-8 is kept."""
    assert split(b"caf\xc3\xa9 \xff\xfe!\n") == ["caf\u00e9 \ufffd\ufffd!"]


def test_a_line_of_exactly_the_limit_is_kept_whole() -> None:
    """MAX_LINE_BYTES bytes is not over the limit: no cut mark."""
    line = b"a" * MAX_LINE_BYTES
    assert split(line + b"\nnext\n") == [line.decode(), "next"]


def test_a_long_line_arriving_in_pieces_is_cut_at_the_limit_once() -> None:
    """The limit counts what is already buffered: two pieces that together pass it give
    one line of exactly MAX_LINE_BYTES bytes plus the mark; the rest of that line is dropped,
    even at the end of the output, and the next line is whole."""
    first, second = b"a" * (MAX_LINE_BYTES - 10), b"b" * 100
    lines = split(first, second, b"c" * 50 + b"\nnext\n")
    assert lines == [(first + b"b" * 10).decode() + " [line cut]", "next"]
    assert split(first, second) == [(first + b"b" * 10).decode() + " [line cut]"]


def test_in_one_chunk_only_the_lines_over_the_limit_are_cut() -> None:
    """A chunk holding a line of exactly MAX_LINE_BYTES bytes and one longer: the first is
    whole, the second cut to the limit plus the mark."""
    whole, long = b"a" * MAX_LINE_BYTES, b"b" * (MAX_LINE_BYTES + 1)
    assert split(whole + b"\n" + long + b"\n") == [
        whole.decode(),
        "b" * MAX_LINE_BYTES + " [line cut]",
    ]


def test_a_text_line_that_is_not_valid_unicode_is_logged_not_raised() -> None:
    """`BoundedLog.add` takes text with a lone surrogate (what `os.fsdecode` makes of bad
    bytes): it is logged with `?` in its place, and nothing raises."""
    out: list[str] = []
    log = BoundedLog(out.append, 5)
    log.add("bad \udcff name")
    log.close()
    assert out == ["bad ? name"]


@pytest.mark.parametrize(
    ("line", "result"),
    [
        ('{"site": "a", "n": 1}', {"site": "a", "n": 1}),
        ('  {"indented": true}  ', {"indented": True}),
        ("[1, 2]", None),
        ('{"broken": ', None),
        ("plain text", None),
        ("", None),
        (None, None),
    ],
)
def test_the_result_is_a_json_object_line_only(line: str | None, result: object) -> None:
    """Only a JSON object is a result (leading spaces allowed); a list, broken JSON, text or
    nothing is no result."""
    assert parse_result(line) == result


def test_the_thread_reader_ends_a_pipe_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows' reader (one thread per pipe), given a stream whose reads fail (a file open
    for writing only: `io.UnsupportedOperation`): the pipe ends, nothing is read from it,
    and the stream is closed."""
    monkeypatch.setattr(output, "READER", "threads")
    with (tmp_path / "write-only").open("wb") as stream:
        pipes = output.open_pipes({"stdout": stream})
        chunks: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 10
        while pipes.open() and time.monotonic() < deadline:
            chunks += pipes.read(0.5)
        pipes.close()
        assert (chunks, pipes.open()) == ([], False)
        assert wait_for(lambda: stream.closed, timeout=10)


def test_a_line_of_exactly_the_limit_read_in_pieces_is_kept_whole() -> None:
    """A line of exactly MAX_LINE_BYTES bytes that comes in three reads before its newline is
    one whole line, with no cut mark."""
    line = b"a" * MAX_LINE_BYTES
    assert split(line[:10], line[10:20], line[20:], b"\nnext\n") == [line.decode(), "next"]


def test_the_end_of_a_cut_line_alone_in_a_read_is_dropped() -> None:
    """The rest of an over-long line that comes alone in a read, its newline included, is
    dropped; the line in the next read is whole."""
    cut = "a" * MAX_LINE_BYTES + " [line cut]"
    assert split(b"a" * (MAX_LINE_BYTES + 5), b"tail\n", b"next\n") == [cut, "next"]


def test_a_flushed_splitter_holds_nothing_of_the_old_stream() -> None:
    """After `flush` the splitter is empty: a second flush gives nothing, and the next bytes
    start a new line."""
    splitter = ChunkSplitter()
    assert splitter.feed(b"old") == []
    assert splitter.flush() == [b"old"]
    assert splitter.flush() == []
    assert splitter.feed(b"new") == []
    assert splitter.flush() == [b"new"]


def test_each_pipe_is_logged_in_the_order_read_stderr_marked() -> None:
    """Lines are logged as they are read: stdout's as they are, stderr's after `[stderr] `,
    a last line without newline at `close`."""
    logged: list[str] = []
    out = AttemptOutput(logged.append, 5)
    out.feed("stdout", b"one\n")
    out.feed("stderr", b"two\n")
    out.feed("stdout", b"three")
    out.close()
    assert logged == ["one", "[stderr] two", "three"]


def test_the_tails_are_the_last_cause_lines_of_each_pipe() -> None:
    """More than CAUSE_LINES lines on each pipe, one read each: `tail` is the last
    CAUSE_LINES of each pipe, `stderr_tail` the last STDERR_TAIL of stderr."""
    out = AttemptOutput(lambda _: None, 5)
    count = CAUSE_LINES + 7
    for n in range(count):
        out.feed("stdout", b"o%d\n" % n)
        out.feed("stderr", b"e%d\n" % n)
    out.close()
    assert out.tail("stdout") == [f"o{n}" for n in range(7, count)]
    assert out.tail("stderr") == [f"e{n}" for n in range(7, count)]
    assert out.stderr_tail() == [f"e{n}" for n in range(count - STDERR_TAIL, count)]


def test_blank_output_has_no_result_and_no_last_line() -> None:
    """Only blank lines read: no result line, no result, no last line seen."""
    out = AttemptOutput(lambda _: None, 5)
    out.feed("stdout", b"\n  \n")
    out.feed("stderr", b"\r\n")
    out.close()
    assert (out.result_line(), out.result(), out.last_seen()) == (None, None, None)


def test_last_output_is_when_the_last_bytes_came() -> None:
    """`last_output` moves to the time of each read, one that finishes no line too."""
    out = AttemptOutput(lambda _: None, 5)
    created = out.last_output
    assert wait_for(lambda: time.monotonic() > created)
    before = time.monotonic()
    out.feed("stdout", b"partial")
    assert before <= out.last_output <= time.monotonic()


@pytest.fixture(params=["select", "threads"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each pipe reader `open_pipes` can give: POSIX's `select` and Windows' threads (which
    runs on POSIX too)."""
    monkeypatch.setattr(output, "READER", request.param)
    return str(request.param)


def test_drain_reads_both_pipes_to_their_end_and_returns_then(reader: str) -> None:
    """What is left in both pipes is read and logged, both pipes end, and drain returns
    then, long before its deadline."""
    streams = {}
    for name in ("stdout", "stderr"):
        read_end, write_end = os.pipe()
        os.write(write_end, f"{name} line\n".encode())
        os.close(write_end)
        streams[name] = os.fdopen(read_end, "rb")
    pipes = output.open_pipes(streams)
    logged: list[str] = []
    out = AttemptOutput(logged.append, 5)
    started = time.monotonic()
    output.drain(pipes, out, until=started + 20)
    elapsed = time.monotonic() - started
    still_open = pipes.open()
    pipes.close()
    out.close()
    assert (sorted(logged), still_open) == (["[stderr] stderr line", "stdout line"], False)
    assert elapsed < 10


def test_drain_stops_at_its_deadline_while_a_pipe_stays_open_and_quiet(reader: str) -> None:
    """A pipe whose writer stays open and writes nothing more: drain logs what came and
    gives up at its deadline (0.05 s), not a second later; the pipe is still open."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"early\n")
    pipes = output.open_pipes({"stdout": os.fdopen(read_end, "rb")})
    logged: list[str] = []
    out = AttemptOutput(logged.append, 5)
    try:
        started = time.monotonic()
        output.drain(pipes, out, until=started + 0.05)
        elapsed = time.monotonic() - started
        assert (logged, pipes.open()) == (["early"], True)
        assert elapsed < 0.95
    finally:
        os.close(write_end)
        pipes.close()


def test_the_select_reader_reads_in_the_calling_thread() -> None:
    """POSIX's reader (the default off Windows) starts no thread: both pipes are read by
    whoever calls `read`."""
    if output.READER != "select":
        pytest.skip("the thread reader is the default here")
    before = set(threading.enumerate())
    read_end, write_end = os.pipe()
    os.write(write_end, b"x\n")
    os.close(write_end)
    pipes = output.open_pipes({"stdout": os.fdopen(read_end, "rb")})
    out = AttemptOutput(lambda _: None, 5)
    output.drain(pipes, out, until=time.monotonic() + 20)
    pipes.close()
    assert set(threading.enumerate()) == before
    assert out.last_seen() == "x"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_SETPIPE_SZ is Linux's")
def test_on_linux_each_pipe_is_widened_to_pipe_bytes() -> None:
    """Linux: once `open_pipes` has a pipe, its writer can put PIPE_BYTES in it without
    waiting (the default holds a quarter of that)."""
    if int(Path("/proc/sys/fs/pipe-max-size").read_text()) < PIPE_BYTES:
        pytest.skip("this system's pipe-max-size is below PIPE_BYTES")
    read_end, write_end = os.pipe()
    pipes = output.open_pipes({"stdout": os.fdopen(read_end, "rb")})
    try:
        os.set_blocking(write_end, False)
        assert os.write(write_end, b"x" * (2 * PIPE_BYTES)) == PIPE_BYTES
    finally:
        os.close(write_end)
        pipes.close()
