"""How the runner turns a pipeline's bytes into log lines and its result: plain Python, no
processes (tests/process/test_attempt.py runs real ones)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flows.process import output
from flows.process.output import MAX_LINE_BYTES, BoundedLog, ChunkSplitter, decode, parse_result
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
