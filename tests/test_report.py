"""Causes in the report: the fingerprint rule, failures grouped by it, and every surface that
shows them (the summary JSON, the tables, the group lines, the Failed message). Plain Python:
no server."""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from flows.cli.console import summary_table
from flows.cli.run import _print_results
from flows.failure_causes import (
    MESSAGE_MAX,
    FailureCause,
    cause_lines,
    cause_lines_of,
    failure_causes,
    failure_message,
    failures_markdown,
    fingerprint,
)
from flows.report import (
    PLAIN_ERROR_WIDTH,
    SiteReport,
    build_summary,
    format_table,
    reports_of,
    table_rows,
)

TIMES = "\N{MULTIPLICATION SIGN}"
NOPKG = "ModuleNotFoundError: No module named 'nopkg'"
IMPORT = (
    "ImportError: cannot import name 'save_schema_matrix' from "
    "'universal_recon.analytics.schema_matrix_collector' (/srv/app/collector.py)"
)


def failed(site: str, cause: str | None, exit_code: int | None = 1) -> SiteReport:
    """A failed site whose error is composed the way the process layer composes it."""
    error = f"exit code {exit_code}" + (f": {cause}" if cause else "")
    return SiteReport(site, "failed", 1, exit_code, 0.5, error, cause=cause)


# The fingerprint rule, one example per step


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        (NOPKG, NOPKG),  # a quoted name is kept
        (
            "requests.exceptions.ConnectionError: GET https://api.example.com/v2/items?page=3&k=x",
            "requests.exceptions.ConnectionError: GET https://api.example.com/v2/items?<query>",
        ),
        (
            "KeyError: 'run 123e4567-e89b-12d3-a456-426614174000 not found'",
            "KeyError: 'run <uuid> not found'",
        ),
        (
            "FileNotFoundError: [Errno 2] No such file or directory: '/tmp/out/site-a/x.json'",
            "FileNotFoundError: [Errno <n>] No such file or directory: '<path>'",
        ),
        (
            "ImportError: cannot import name 'f' from 'pkg.mod' (C:\\app\\mod.py)",
            "ImportError: cannot import name 'f' from 'pkg.mod' (<path>)",
        ),
        (
            "RuntimeError: <Session object at 0x7f3a9c01be20> closed; commit 3f9c2ab1d",
            "RuntimeError: <Session object at <hex>> closed; commit <hex>",
        ),
        (
            "TimeoutError: no answer after 30.5 s, 1,000 tries",
            "TimeoutError: no answer after <n> s, <n> tries",
        ),
        ("ValueError: site2 uses http2 and utf-8", "ValueError: site2 uses http2 and utf-<n>"),
        ("  scraped   12 of   40 pages  ", "scraped <n> of <n> pages"),
        ("2026-12-01 03:12:09 ERROR giving up", "<n>-<n>-<n> <n>:<n>:<n> ERROR giving up"),
        ("deadbeef is a word", "deadbeef is a word"),  # letters only: not a hex id
    ],
)
def test_the_fingerprint_normalises_each_varying_part(cause: str, expected: str) -> None:
    """Each step of the documented rule: URL queries, UUIDs, quoted paths, hex ids and
    numbers are normalised; names, words and digits inside words are kept."""
    assert fingerprint(cause) == expected


TEXT = st.text(alphabet="abcXYZ _-:'\"/()[]<>,;", max_size=30)
NAME = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,10}(\.[A-Za-z_][A-Za-z0-9_]{0,10}){0,2}\Z")


@given(TEXT, TEXT, st.integers(0, 10**12), st.integers(0, 10**12))
def test_causes_that_differ_only_in_a_number_share_a_fingerprint(
    before: str, after: str, one: int, other: int
) -> None:
    """Two causes that differ only in a number standing alone have one fingerprint."""
    assert fingerprint(f"{before} {one} {after}") == fingerprint(f"{before} {other} {after}")


@given(NAME, NAME, st.text(max_size=60), st.text(max_size=60))
def test_different_exception_types_never_share_a_fingerprint(
    one: str, other: str, message: str, message_2: str
) -> None:
    """`A: ...` and `B: ...` never share a fingerprint, whatever their messages say."""
    if one != other:
        assert fingerprint(f"{one}: {message}") != fingerprint(f"{other}: {message_2}")


@given(st.text(max_size=200))
def test_the_fingerprint_of_a_fingerprint_is_itself(cause: str) -> None:
    """Any text has a fingerprint (no error), and normalising it again changes nothing."""
    once = fingerprint(cause)
    assert fingerprint(once) == once


@given(NAME, NAME)
def test_different_missing_modules_never_share_a_fingerprint(one: str, other: str) -> None:
    """The quoted name is the cause: `No module named 'a'` and `... 'b'` stay apart."""
    if one != other:
        assert fingerprint(f"ModuleNotFoundError: No module named '{one}'") != fingerprint(
            f"ModuleNotFoundError: No module named '{other}'"
        )


# Groups


def test_failures_group_by_the_fingerprint_of_their_cause_biggest_first() -> None:
    """Sites group by cause (numbers aside), the biggest group first; a site without a cause
    falls back to its kind; the label is the first site's cause; successes are not in it."""
    reports = [
        SiteReport("ok-a", "succeeded", 1, 0, 0.1),
        failed("imp-a", IMPORT),
        failed("pyerr-a", NOPKG),
        failed("imp-b", IMPORT.replace("/srv/app", "/home/me/app")),  # another path
        failed("imp-c", IMPORT, exit_code=2),
        failed("pyerr-b", NOPKG),
        failed("bare-a", None),
        failed("net-a", "OSError: port 8001 refused"),
        failed("net-b", "OSError: port 8002 refused"),
    ]
    groups = failure_causes(reports)
    assert groups[0] == FailureCause(fingerprint(IMPORT), IMPORT, ["imp-a", "imp-b", "imp-c"])
    assert [(g.label, g.sites) for g in groups[1:]] == [
        (NOPKG, ["pyerr-a", "pyerr-b"]),  # ties: by fingerprint
        ("OSError: port 8001 refused", ["net-a", "net-b"]),
        ("exit code 1", ["bare-a"]),
    ]


def test_timeouts_cancellations_and_kinds_have_groups_of_their_own() -> None:
    """A timeout groups by its error without the last line seen; a stall apart from it; a
    cancelled site by why it was cancelled; a kind (no slot) wins over a cause."""
    reports = [
        SiteReport(
            "slow-a", "timed_out", 1, None, 30, "timed out after 30 s: page 3", cause="page 3"
        ),
        SiteReport(
            "slow-b",
            "timed_out",
            1,
            None,
            45,
            "timed out after 45 s: fetching b",
            cause="fetching b",
        ),
        SiteReport("stuck-a", "timed_out", 1, None, 20, "stalled: no output for 20 s"),
        SiteReport("halt-a", "cancelled", 0, None, 0, "the run halted after 3 failures"),
        SiteReport("halt-b", "cancelled", 0, None, 0, "the run halted after 3 failures"),
        SiteReport("slot-a", "failed", 0, None, 0, "no slot: gone", cause="x", kind="no slot"),
    ]
    assert [(g.label, g.sites) for g in failure_causes(reports)] == [
        ("the run halted after 3 failures", ["halt-a", "halt-b"]),
        ("timed out after 30 s", ["slow-a", "slow-b"]),
        ("no slot", ["slot-a"]),
        ("stalled: no output for 20 s", ["stuck-a"]),
    ]


def test_one_line_per_group_with_and_n_more_past_five_names() -> None:
    """`2 sites: <cause> (a, b)`, `1 site: ...`, and past five names "and N more"."""
    reports = [failed(f"pyerr-{n}", NOPKG) for n in range(7)] + [failed("bare", None)]
    assert cause_lines(reports) == [
        f"7 sites: {NOPKG} (pyerr-0, pyerr-1, pyerr-2, pyerr-3, pyerr-4, and 2 more)",
        "1 site: exit code 1 (bare)",
    ]
    assert cause_lines(reports[:2]) == [f"2 sites: {NOPKG} (pyerr-0, pyerr-1)"]
    assert cause_lines([SiteReport("ok", "succeeded", 1, 0, 0.1)]) == []


def test_the_group_lines_of_a_summary_are_those_of_its_reports() -> None:
    """The CLI has the summary dict only: its rows give the same lines; a result check
    failure (its kind is not in the JSON) still says "result check"; a row from an older
    summary, without `cause` and `logs`, still reads."""
    check = {"field": "records", "value": 1, "ok": False, "reason": "records = 1, below min 5"}
    reports = [
        failed("pyerr-a", NOPKG),
        failed("pyerr-b", NOPKG),
        SiteReport("few", "failed", 1, 0, 0.1, "records = 1, below min 5", check=check),
    ]
    summary = build_summary("id", reports)
    assert cause_lines_of(summary) == [
        f"2 sites: {NOPKG} (pyerr-a, pyerr-b)",
        "1 site: result check (few)",
    ]
    old = json.loads(json.dumps(summary))
    for row in old["sites"]:
        del row["cause"], row["logs"]
        row["added_later"] = 1
    assert [r.cause for r in reports_of(old)] == [None, None, None]
    assert cause_lines_of(old)[0] == "2 sites: exit code 1 (pyerr-a, pyerr-b)"


# The surfaces


def test_the_summary_json_has_the_cause_and_the_logs() -> None:
    """`cause` and `logs` are in each site's JSON; `kind` and `stderr_tail` are not."""
    report = failed("pyerr-a", NOPKG)
    report.logs = ["/out/pyerr-a/logs/run/attempt-1.log"]
    report.stderr_tail, report.kind = ["x"], "k"
    row = build_summary("id", [report])["sites"][0]
    assert row["error"] == f"exit code 1: {NOPKG}" and row["cause"] == NOPKG
    assert row["logs"] == ["/out/pyerr-a/logs/run/attempt-1.log"]
    assert "kind" not in row and "stderr_tail" not in row
    assert SiteReport("s", "succeeded", 1, 0, 0.1).to_json()["logs"] == []


def test_a_summary_row_reads_back_as_the_report_it_was() -> None:
    """`to_json` and `from_json` are one round trip (less `kind` and `stderr_tail`), with
    `stopped_by`; a row of an older summary (no `stopped_by`) reads back with null."""
    report = SiteReport(
        "slow", "timed_out", 2, -15, 30.0, "timed out after 30 s", stopped_by="timeout"
    )
    row = build_summary("id", [report])["sites"][0]
    assert row["stopped_by"] == "timeout"
    assert SiteReport.from_json(row) == report
    del row["stopped_by"]
    assert SiteReport.from_json(row | {"unknown": 1}).stopped_by is None


def test_the_failures_artifact_groups_by_cause_and_lists_each_site_with_its_error() -> None:
    """The markdown: one heading per cause, biggest first (a code span when markdown would
    change it), each site with its attempts and its error (which has the cause)."""
    reports = [failed("pyerr-a", NOPKG), failed("pyerr-b", NOPKG), failed("bare", None)]
    reports[2].stderr_tail = ["last words"]
    reports.append(failed("init", "AttributeError: module has no attribute '__init__' `x`"))
    assert failures_markdown(reports) == (
        "# Failed sites by cause\n\n"
        f"## {NOPKG} (2)\n\n"
        f"- `pyerr-a` after 1 attempt(s): exit code 1: {NOPKG}\n"
        f"- `pyerr-b` after 1 attempt(s): exit code 1: {NOPKG}\n\n"
        "## `AttributeError: module has no attribute '__init__' 'x'` (1)\n\n"
        "- `init` after 1 attempt(s): exit code 1: AttributeError: module has no attribute "
        "'__init__' `x`\n\n"
        "## exit code 1 (1)\n\n"
        "- `bare` after 1 attempt(s): last words\n"
    )


def test_the_table_artifact_has_the_error_and_the_cause() -> None:
    """The UI's table: `error` with the cause, `cause` alone, and `last_stderr` still."""
    report = failed("pyerr-a", NOPKG)
    report.stderr_tail = ["Traceback (most recent call last):", "  import nopkg", NOPKG]
    row = table_rows([report])[0]
    assert (row["error"], row["cause"]) == (f"exit code 1: {NOPKG}", NOPKG)
    assert row["last_stderr"] == f"Traceback (most recent call last): |   import nopkg | {NOPKG}"


def test_the_plain_table_cuts_a_long_error() -> None:
    """Not a terminal: the error with its cause, on one line, cut at PLAIN_ERROR_WIDTH."""
    long_cause = "ValueError: " + "x" * 300
    table = format_table(build_summary("id", [failed("a", NOPKG), failed("b", long_cause)]))
    rows = table.splitlines()
    assert rows[1].endswith(f"exit code 1: {NOPKG}")
    cell = rows[2][rows[0].index("ERROR") :]
    assert len(cell) == PLAIN_ERROR_WIDTH and cell.endswith("…")
    assert cell.startswith("exit code 1: ValueError: xxx")


@pytest.mark.parametrize("width", [80, 160])
def test_the_terminal_table_cuts_the_error_to_fit_and_keeps_the_other_columns(width: int) -> None:
    """On a terminal, each row is one line no wider than the terminal: the error is cut with
    an ellipsis; the site, status and numbers stay whole."""
    site = "realtor_directory.example.com"
    summary = build_summary("id", [failed(site, "ValueError: " + "y" * 300), failed("b", NOPKG)])
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=True, color_system=None).print(
        summary_table(summary, width)
    )
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # header, rule, two rows: no wrapped lines
    assert all(len(line) <= width for line in lines)
    assert lines[2].startswith(site) and "failed" in lines[2] and lines[2].endswith("…")
    assert "exit code" in lines[2]
    if width == 160:
        assert "exit code 1: ValueError: yyy" in lines[2]
        assert lines[3].rstrip().endswith(f"exit code 1: {NOPKG}")


def test_the_failed_message_names_the_largest_groups_and_the_long_streaks_first() -> None:
    """`k of n sites failed: failing 3+ runs in a row: a (5), b (3); 3 × <cause> (..); ...`:
    streaks below 3 (or of sites not in this run) are not named; the three largest groups
    are; the rest are counted."""  # noqa: RUF002
    reports = [
        *(failed(f"imp-{n}", IMPORT) for n in "abc"),
        failed("pyerr-a", NOPKG),
        failed("bare", None),
        failed("other", "OSError: gone"),
        SiteReport("ok", "succeeded", 1, 0, 0.1),
    ]
    streaks = {"pyerr-a": 5, "imp-b": 3, "imp-a": 2, "ok": 0, "gone": 7}  # gone: not run
    message = failure_message(reports, streaks=streaks)
    assert message is not None
    head = "6 of 7 sites failed: failing 3+ runs in a row: pyerr-a (5), imp-b (3); "
    assert message.startswith(head), message
    groups = message[len(head) :].split("; ")
    assert groups[0] == f"3 {TIMES} {IMPORT[:99]}… (imp-a, imp-b, imp-c)"
    assert groups[1:] == [  # ties: by fingerprint
        f"1 {TIMES} {NOPKG} (pyerr-a)",
        f"1 {TIMES} OSError: gone (other)",
        "1 more cause (1 site)",
    ]
    assert failure_message(reports[:1]) == f"1 of 1 sites failed: 1 {TIMES} {IMPORT[:99]}… (imp-a)"
    assert failure_message(reports[-1:]) is None


def test_the_failed_message_stays_one_bounded_line() -> None:
    """200 sites, each with its own long cause over several lines and a streak: one line of
    at most MESSAGE_MAX characters."""
    reports = [failed(f"site-{n}", f"E{n}Error: {'z' * 280}\nmore") for n in range(200)]
    message = failure_message(reports, streaks={r.site: 9 for r in reports})
    assert message is not None and "\n" not in message
    assert len(message) <= MESSAGE_MAX and message.startswith("200 of 200 sites failed: ")


def test_the_cli_prints_one_line_per_group_after_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`site-pipeline run`'s results, through a pipe: the table, the count line, then one
    line per failure cause, then the summary path."""
    summary = build_summary(
        "id",
        [
            failed("pyerr-a", NOPKG),
            failed("pyerr-b", NOPKG),
            SiteReport("ok", "succeeded", 1, 0, 0.1),
        ],
    )
    summary_path = tmp_path / "summary.json"
    _print_results(argparse.Namespace(summary_json=str(summary_path)), summary, None)
    lines = capsys.readouterr().out.splitlines()
    count_at = next(n for n, line in enumerate(lines) if line.startswith("Failed: 1/3 succeeded"))
    assert lines[count_at + 1 :] == [
        f"2 sites: {NOPKG} (pyerr-a, pyerr-b)",
        f"summary: {summary_path}",
    ]
    assert re.search(r"pyerr-a\s+failed\s+1\s+1", "\n".join(lines[:count_at]))
    assert json.loads(summary_path.read_text())["sites"][0]["cause"] == NOPKG
