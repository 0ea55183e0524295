"""The cause of a failed attempt: the rules on plain text, then real pipelines that fail the
way real ones do (tests/support/fakes/cause_pipeline.py), run through run_attempt."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import pytest

from flows.process.attempt import AttemptOutcome, run_attempt
from flows.process.cause import CAUSE_CHARS, CAUSE_LINES, cause_of, clean, cut, strip_ansi

CAUSE_FAKE = Path(__file__).resolve().parents[1] / "support" / "fakes" / "cause_pipeline.py"

HEADER = "Traceback (most recent call last):"
SYNTAX = [
    '  File "/srv/site.py", line 3',
    "    def (",
    "        ^",
    "SyntaxError: invalid syntax",
]
CHAINED = [
    "Traceback (most recent call last):",
    '  File "a.py", line 1, in <module>',
    "KeyError: 'token'",
    "",
    "During handling of the above exception, another exception occurred:",
    "",
    "Traceback (most recent call last):",
    '  File "a.py", line 3, in <module>',
    "    raise RuntimeError('login failed')",
    "RuntimeError: login failed",
]


def run(site: str, tmp_path: Path, **more: object) -> AttemptOutcome:
    argv = [sys.executable, str(CAUSE_FAKE), "--site", site]
    return run_attempt(
        argv, cwd=tmp_path, env=dict(os.environ), timeout=30, kill_grace=1,
        log=lambda _: None, **more,  # type: ignore[arg-type]
    )  # fmt: skip


# -- The rules, on text -------------------------------------------------------------------


def test_a_traceback_gives_its_final_exception_line_even_with_lines_after_it() -> None:
    """The exception line that ends a traceback is the cause, though other stderr lines come
    after it (a logger's last words); the last stderr line is only the fallback."""
    stderr = ["starting", *CHAINED[6:], "INFO shutting down"]
    assert cause_of(stderr, []) == "RuntimeError: login failed"


def test_a_chained_traceback_gives_its_last_exception() -> None:
    """Of a chained traceback's exceptions, the last one (the one raised last) is the cause."""
    assert cause_of(CHAINED, []) == "RuntimeError: login failed"


def test_a_syntax_error_without_a_traceback_header_is_found() -> None:
    """A script that does not compile prints frames but no `Traceback` header: its
    SyntaxError line is still the cause (the ^ line under the code is skipped)."""
    assert cause_of(SYNTAX, ["some stdout"]) == "SyntaxError: invalid syntax"


def test_dotted_names_and_bare_names_count_as_exceptions() -> None:
    """`requests.exceptions.ConnectionError: ...` and a bare `KeyboardInterrupt` end a
    traceback; a plain sentence after the frames does not count as one."""
    frame = ['  File "x.py", line 9, in get']
    dotted = "requests.exceptions.ConnectionError: Max retries exceeded"
    assert cause_of([*frame, dotted], []) == dotted
    assert cause_of([*frame, "KeyboardInterrupt"], []) == "KeyboardInterrupt"
    assert cause_of([*frame, "the job was stopped", "last"], []) == "last"


def test_without_a_traceback_the_last_non_empty_stderr_line_is_the_cause() -> None:
    """No traceback: the last stderr line that is not blank, stdout not looked at."""
    assert cause_of(["first", "the real one", "   ", ""], ["stdout line"]) == "the real one"


def test_a_traceback_on_stdout_beats_the_last_stderr_line() -> None:
    """A pipeline that logs its traceback to stdout: that exception is the cause, not the
    stderr line after it."""
    assert cause_of(["a warning"], SYNTAX) == "SyntaxError: invalid syntax"


def test_without_stderr_the_last_stdout_line_that_is_not_the_result_is_the_cause() -> None:
    """With nothing on stderr, the last non-empty stdout line is the cause, unless it is
    the result JSON line: then the one before it."""
    result = '{"records": 0}'
    assert cause_of([], ["fetched 0 pages", result, ""], result) == "fetched 0 pages"
    assert cause_of(["", " "], ["only line"]) == "only line"
    assert cause_of([], [result], result) is None
    assert cause_of([], []) is None


def test_ansi_escapes_carriage_returns_and_length_are_cleaned() -> None:
    """Colours and OSC titles go, a progress bar keeps only what it showed last, control
    characters go, and a long cause is cut to CAUSE_CHARS characters ending in `…`."""
    assert strip_ansi("\x1b[1;31mError\x1b[0m: \x1b]0;title\x07x") == "Error: x"
    assert clean("10%\r50%\r\x1b[32mdone\x1b[0m\r") == "done"
    assert clean("bell\x07 and \x00nul") == "bell and nul"
    long = clean("E" * 1000)
    assert len(long) == CAUSE_CHARS and long.endswith("…")
    assert cut("short") == "short" and cut("abcdef", 4) == "abc…"


def test_a_frame_without_a_code_line_is_followed_by_its_exception() -> None:
    """`python -c` and a frozen module print frames with no code line under them: the line
    right after the last frame is the exception, though more stderr follows it."""
    frame = '  File "<string>", line 1, in <module>'
    stderr = [HEADER, frame, "ZeroDivisionError: division by zero", "INFO exit"]
    assert cause_of(stderr, []) == "ZeroDivisionError: division by zero"


def test_lines_indented_with_a_tab_after_the_frame_are_skipped() -> None:
    """A tab indents as a space does: the frame's code, not an exception line."""
    stderr = ['  File "a.py", line 2, in f', "\tcall(x)", "ValueError: x", "INFO exit"]
    assert cause_of(stderr, []) == "ValueError: x"


def test_an_exception_line_with_trailing_blanks_still_counts() -> None:
    """Blanks after a bare exception name (a pipeline that pads its lines) don't hide it."""
    stderr = ['  File "a.py", line 2, in f', "KeyboardInterrupt   ", "INFO exit"]
    assert cause_of(stderr, []) == "KeyboardInterrupt"


def test_an_unfinished_last_traceback_does_not_borrow_an_earlier_exception() -> None:
    """The pipeline died while printing a second error (a SyntaxError's report, which has
    no header, cut after its first frame): the earlier exception is not the cause of the
    last traceback, which has none; the last stderr line is the cause."""
    assert cause_of([*CHAINED, '  File "b.py", line 5'], []) == 'File "b.py", line 5'


def test_a_progress_line_wiped_with_blanks_is_not_a_cause() -> None:
    """A progress bar wiped the usual way (`\\r`, blanks, `\\r`) shows nothing on a
    terminal: it is empty once cleaned, and the line before it is the cause."""
    wiped = "downloading 50%\r" + " " * 20 + "\r"
    assert clean(wiped) == ""
    assert cause_of(["error: the site said 503", wiped], []) == "error: the site said 503"
    assert clean("50%\rsaved to ./out/TAX\r") == "saved to ./out/TAX"  # only the \r goes


def test_a_cause_of_exactly_cause_chars_is_kept_whole() -> None:
    """CAUSE_CHARS characters is not over the limit: no cut, no `…`."""
    assert clean("E" * CAUSE_CHARS) == "E" * CAUSE_CHARS
    assert cut("abcd", 4) == "abcd"


def test_a_coloured_traceback_is_read_through_its_colours() -> None:
    """Python 3.13 colours its tracebacks: the frame and exception lines are still seen."""
    red = "\x1b[1;35mValueError\x1b[0m: \x1b[35mbad\x1b[0m"
    assert cause_of(['  \x1b[35mFile "x.py"\x1b[0m, line 2, in f', red], []) == "ValueError: bad"


# -- Real pipelines ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("site", "cause"),
    [
        ("pyerr-a", "ModuleNotFoundError: No module named 'nopkg'"),
        ("chained-a", "RuntimeError: login failed: no token in the response"),
        (
            "dotted-a",
            "requests.exceptions.ConnectionError: HTTPSConnectionPool(host='example.com', "
            "port=443): Max retries exceeded",
        ),
    ],
)
def test_a_real_python_exception_is_the_cause_and_in_the_error(
    tmp_path: Path, site: str, cause: str
) -> None:
    """A pipeline that dies of a real Python exception: the outcome's cause is the
    exception line alone, and its error is `exit code 1: <cause>`."""
    outcome = run(site, tmp_path)
    assert (outcome.status, outcome.exit_code) == ("failed", 1)
    assert outcome.cause == cause
    assert outcome.error == f"exit code 1: {cause}"


def test_a_real_import_error_names_what_could_not_be_imported(tmp_path: Path) -> None:
    """`from json import save_schema_matrix`: the ImportError line, cut to CAUSE_CHARS."""
    outcome = run("importerr-a", tmp_path)
    assert outcome.cause is not None
    assert outcome.cause.startswith("ImportError: cannot import name 'save_schema_matrix'")
    assert len(outcome.cause) <= CAUSE_CHARS


def test_a_coloured_error_line_is_the_cause_without_its_colours(tmp_path: Path) -> None:
    """No traceback, exit 3: the last stderr line, ANSI escapes stripped."""
    outcome = run("ansi-a", tmp_path)
    assert outcome.cause == "ERROR: the site said 503"
    assert outcome.error == "exit code 3: ERROR: the site said 503"


def test_a_failure_that_prints_nothing_keeps_the_bare_error(tmp_path: Path) -> None:
    """Silent exit 4: no cause, and the error is as it always was."""
    argv = [sys.executable, "-c", "import sys; sys.exit(4)"]
    outcome = run_attempt(argv, cwd=tmp_path, env=os.environ, timeout=30, kill_grace=1, log=print)
    assert (outcome.cause, outcome.error) == (None, "exit code 4")


def test_a_failure_on_stdout_alone_has_the_line_before_its_result_as_cause(
    tmp_path: Path,
) -> None:
    """Exit 1 with nothing on stderr, and a result JSON as the last stdout line: the result
    is never the cause, the line before it is."""
    script = (
        "import json; print('fetched 0 pages'); print(json.dumps({'records': 0})); "
        "raise SystemExit(1)"
    )
    outcome = run_attempt(
        [sys.executable, "-c", script], cwd=tmp_path, env=os.environ, timeout=30,
        kill_grace=1, log=lambda _: None,
    )  # fmt: skip
    assert outcome.result == {"records": 0}
    assert (outcome.cause, outcome.error) == ("fetched 0 pages", "exit code 1: fetched 0 pages")


def test_a_signal_death_says_which_signal_and_its_cause(tmp_path: Path) -> None:
    """A pipeline killed by SIGKILL after a stderr line: `killed by signal 9: <line>`."""
    script = (
        "import os, signal, sys; print('out of memory soon', file=sys.stderr, flush=True); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    outcome = run_attempt(
        [sys.executable, "-c", script], cwd=tmp_path, env=os.environ, timeout=30,
        kill_grace=1, log=lambda _: None,
    )  # fmt: skip
    assert outcome.error == "killed by signal 9: out of memory soon"
    assert outcome.cause == "out of memory soon"


@pytest.mark.parametrize(
    "payload",
    [
        "b'\\xff\\xfe bad bytes \\xc3(' * 3 + b'\\n'",  # invalid UTF-8
        "b'z' * (64 << 20)",  # 64 MB on stderr with no newline at all
    ],
    ids=["invalid-utf8", "no-newline"],
)
def test_hostile_stderr_still_gives_a_bounded_cause(tmp_path: Path, payload: str) -> None:
    """Invalid UTF-8, or tens of MB on stderr with no newline: a cause still comes out (bad
    bytes as U+FFFD, the endless line cut), and memory stays far below what was printed."""
    script = f"import sys; sys.stderr.buffer.write({payload}); sys.exit(1)"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = run_attempt(
        [sys.executable, "-c", script], cwd=tmp_path, env=os.environ, timeout=60,
        kill_grace=1, log=lambda _: None,
    )  # fmt: skip
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert outcome.cause is not None and outcome.error == f"exit code 1: {outcome.cause}"
    assert len(outcome.cause) <= CAUSE_CHARS
    assert "\ufffd" in outcome.cause or outcome.cause.startswith("zzz")
    assert grown_mb < 40, f"peak RSS grew by {grown_mb:.0f} MB"


def test_the_cause_is_looked_for_in_the_last_lines_only(tmp_path: Path) -> None:
    """A traceback followed by more than CAUSE_LINES other stderr lines is out of reach:
    the cause is then the last stderr line (the tails are bounded)."""
    lines = "\n".join(f"line {n}" for n in range(CAUSE_LINES + 5))
    script = (
        "import sys, traceback\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    traceback.print_exc()\n"
        f"print({lines!r}, file=sys.stderr); sys.exit(1)\n"
    )
    outcome = run_attempt(
        [sys.executable, "-c", script], cwd=tmp_path, env=os.environ, timeout=30,
        kill_grace=1, log=lambda _: None,
    )  # fmt: skip
    assert outcome.cause == f"line {CAUSE_LINES + 4}"
