"""How the runner turns a pipeline's bytes into log lines and its result: plain Python, no
processes (tests/process/test_attempt.py runs real ones)."""

from __future__ import annotations

import pytest

from flows.process.output import MAX_LINE_BYTES, ChunkSplitter, decode, parse_result


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
