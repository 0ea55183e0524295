"""Why an attempt failed, in one line, read from the end of the pipeline's own output.

Plain Python, run once per attempt on the bounded tails `flows.process.output` keeps (the
last `CAUSE_LINES` lines of each pipe), never once per line. `cause_of` picks, in order:

1. the final exception line of the last Python traceback, on stderr, else on stdout: the
   first line after the traceback's last frame (`  File "...", line N`) that is not
   indented and looks like `Name: message` or `Name`, dotted names included
   (`requests.exceptions.ConnectionError: ...`). A chained traceback ("During handling of
   the above exception ...") ends with its last exception, so that is the one taken; a
   `SyntaxError` with no `Traceback` header is found the same way;
2. else the last non-empty stderr line;
3. else the last non-empty stdout line that is not the result JSON line.

Each line is cleaned first: ANSI escapes stripped, a progress bar's `\\r` rewrites reduced
to what the terminal would show last, other control characters dropped, and the result cut
at `CAUSE_CHARS` characters (with `…`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CAUSE_CHARS = 300  # a cause is cut to about this many characters
CAUSE_LINES = 50  # the lines of each pipe's end that a cause is looked for in

_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: titles, hyperlinks
    r"|\x1b[@-Z\\-_]"  # the other two-character escapes
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_FRAME = re.compile(r'^\s+File "[^"]*", line \d+')
_HEADER = "Traceback (most recent call last):"
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?::(?:\s.*)?)?$")


def strip_ansi(text: str) -> str:
    """`text` without ANSI escape sequences (colours, cursor moves, OSC titles)."""
    return _ANSI.sub("", text)


def cut(text: str, limit: int = CAUSE_CHARS) -> str:
    """`text` at most `limit` characters long: a longer one is cut and ends with `…`."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clean(line: str) -> str:
    """One output line as a person would read it: ANSI escapes gone, only the last of its
    carriage-return rewrites, no control characters, no surrounding blanks, cut."""
    text = strip_ansi(line).rstrip("\r").rsplit("\r", 1)[-1]
    return cut(_CONTROL.sub("", text).strip())


def traceback_line(lines: Sequence[str]) -> str | None:
    """The exception line that ends the last Python traceback in `lines`, if there is one."""
    lines = [strip_ansi(line) for line in lines]  # colour tracebacks (Python 3.13+)
    start = None
    for index in range(len(lines) - 1, -1, -1):
        line = lines[index]
        if _FRAME.match(line) or line.startswith(_HEADER):
            start = index
            break
    if start is None:
        return None
    for line in lines[start + 1 :]:
        if not line.strip() or line[:1] in (" ", "\t"):
            continue  # the frame's code, its ^^^^ marks, "[Previous line repeated ...]"
        text = line.rstrip()
        return clean(text) if _EXCEPTION.match(text) else None
    return None


def last_line(lines: Sequence[str], skip: str | None = None) -> str | None:
    """The last line of `lines` that is not empty once cleaned (and is not `skip`)."""
    for line in reversed(lines):
        if skip is not None and line.strip() == skip.strip():
            continue
        text = clean(line)
        if text:
            return text
    return None


def cause_of(
    stderr_tail: Sequence[str], stdout_tail: Sequence[str], result_line: str | None = None
) -> str | None:
    """The one line that says why the attempt failed (the rules are in the module docstring);
    None when the pipeline printed nothing worth showing. `result_line` is the stdout line
    read as the result, never a cause."""
    return (
        traceback_line(stderr_tail)
        or traceback_line(stdout_tail)
        or last_line(stderr_tail)
        or last_line(stdout_tail, skip=result_line)
    )


__all__ = [
    "CAUSE_CHARS",
    "CAUSE_LINES",
    "cause_of",
    "clean",
    "cut",
    "last_line",
    "strip_ansi",
    "traceback_line",
]
