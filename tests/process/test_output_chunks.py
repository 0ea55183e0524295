"""The per-chunk fast path of flows/process/output.py gives what a line-by-line reading
would: however the bytes are cut into reads, and however the lines come in blocks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from flows.process.output import MAX_LINE_BYTES, AttemptOutput, BoundedLog, ChunkSplitter

LINE = st.binary(max_size=40) | st.just(b"\r") | st.just(b"y" * (MAX_LINE_BYTES + 3))


def split_all(chunks: list[bytes]) -> list[bytes]:
    splitter = ChunkSplitter()
    lines = [line for chunk in chunks for line in splitter.feed(chunk)]
    return lines + splitter.flush()


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *marks], [*marks, len(data)], strict=True)]


@settings(max_examples=200, deadline=None)
@given(st.lists(LINE, max_size=12), st.lists(st.integers(0, 10**6), max_size=8))
def test_how_the_stream_is_cut_into_reads_never_changes_the_lines(
    parts: list[bytes], points: list[int]
) -> None:
    """The same bytes, read in one piece or cut anywhere (inside a line, a CRLF or an
    over-long line), split into the same lines."""
    data = b"\n".join(parts)
    assert split_all(cuts(data, points)) == split_all([data])


def reference(lines: list[str], limit: int) -> list[str]:
    """BoundedLog's promise, written plainly: the first `limit`, a note, the last `limit`."""
    if len(lines) <= 2 * limit:
        return lines
    left_out = len(lines) - 2 * limit
    note = f"... {left_out} output lines not logged (only the first and last {limit} are kept) ..."
    return [*lines[:limit], note, *lines[-limit:]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 9), max_size=12), st.integers(1, 6))
def test_lines_in_blocks_are_logged_as_if_one_by_one(sizes: list[int], limit: int) -> None:
    """Lines added in blocks of any size: the first `limit` live, then how many were left
    out, then the last `limit`, in order; `total` and `dropped` count right."""
    out: list[str] = []
    log = BoundedLog(out.append, limit)
    counter = 0
    for size in sizes:
        log.add_lines([str(counter + n).encode() for n in range(size)], "p:")
        counter += size
    log.close()
    assert out == reference([f"p:{n}" for n in range(counter)], limit)
    assert log.total == counter and log.dropped == max(0, counter - 2 * limit)


def test_the_output_keeps_the_last_lines_the_result_and_the_last_line_seen() -> None:
    """stderr's tail and stdout's last non-empty line survive blank lines after them; the
    last line seen is the newest non-empty line of either pipe, a last unfinished one too."""
    output = AttemptOutput(lambda _: None, 5)
    output.feed("stdout", b'{"n": 1}\n\n  \n')
    output.feed("stderr", b"e1\ne2\r\n\n")
    output.feed("stderr", b"partial")
    output.close()
    assert output.result() == {"n": 1}
    assert output.stderr_tail() == ["e1", "e2", "", "partial"]
    assert output.last_seen() == "partial"
