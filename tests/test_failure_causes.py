"""The summary's contents, cell by cell: what the table, the failures artifact and the count
line say for each kind of outcome. Plain Python: no server."""

from __future__ import annotations

from flows.failure_causes import failure_kind, failure_message, failures_markdown
from flows.report import (
    SiteReport,
    as_bools,
    build_summary,
    compact_result,
    count_line,
    counts,
    format_table,
    progress_line,
    table_rows,
    warning_message,
)

CHECK_FAILED = {"field": "records", "value": 3, "ok": False, "reason": "records = 3, below min 5"}
CHECK_OK = {"field": "records", "value": 9, "ok": True, "reason": None}


def outcomes() -> list[SiteReport]:
    """One site of each kind, in a fixed order."""
    return [
        SiteReport("ok.com", "succeeded", 1, 0, 1.23456, result={"records": 9}, check=CHECK_OK),
        SiteReport("warn.com", "succeeded", 2, 0, 2.0, check=CHECK_FAILED),
        SiteReport(
            "exit.com", "failed", 3, 3, 0.5, "exit code 3", stderr_tail=["a", "b", "c", "d"]
        ),
        SiteReport("killed.com", "failed", 1, -9, 0.1, "killed by signal 9"),
        SiteReport("slow.com", "timed_out", 2, None, 60.0, "timed out after 60s"),
        SiteReport("gone.com", "failed", 1, None, 0.0, "could not start 'x': No such file"),
        SiteReport("crash.com", "failed", 1, None, 0.0, "boom"),
        SiteReport("stop.com", "cancelled", 1, None, 0.0, "cancelled by SIGTERM"),
        SiteReport("noslot.com", "failed", 0, None, 0.0, "no slot", kind="no slot"),
        SiteReport("done.com", "skipped", 0, None, 0.0, "succeeded in flow run x"),
    ]


def test_counts_tally_each_status_and_check_warnings() -> None:
    """Every status is counted once; a succeeded site whose check failed is a warning."""
    assert counts(outcomes()) == {
        "total": 10,
        "succeeded": 2,
        "failed": 5,
        "timed_out": 1,
        "cancelled": 1,
        "skipped": 1,
        "check_warnings": 1,
    }


def test_each_failure_lands_in_its_own_kind() -> None:
    """The failures-by-kind grouping for each kind of failure."""
    kinds = {r.site: failure_kind(r) for r in outcomes() if r.status != "succeeded"}
    assert kinds == {
        "exit.com": "exit code 3",
        "killed.com": "killed by signal 9",
        "slow.com": "timed out",
        "gone.com": "could not start",
        "crash.com": "crashed",
        "stop.com": "cancelled",
        "noslot.com": "no slot",
        "done.com": "skipped",
    }


def test_failures_markdown_groups_biggest_first_with_the_last_stderr_line() -> None:
    """Without causes, groups by kind (a cancelled or timed-out site by its error, a crash by
    its error), largest first then by key; each line names the site, its attempts and its
    last stderr line (else its error). Skipped and succeeded sites are not in it."""
    reports = [
        *outcomes(),
        SiteReport("exit2.com", "failed", 1, 3, 0.1, "exit code 3"),
    ]
    text = failures_markdown(reports)
    assert text is not None
    lines = text.splitlines()
    assert lines[:3] == ["# Failed sites by cause", "", "## exit code 3 (2)"]
    assert "- `exit.com` after 3 attempt(s): d" in lines
    assert "- `exit2.com` after 1 attempt(s): exit code 3" in lines
    headings = [line for line in lines if line.startswith("## ")]
    assert headings == [
        "## exit code 3 (2)",
        "## boom (1)",
        "## cancelled by SIGTERM (1)",
        "## could not start (1)",
        "## killed by signal 9 (1)",
        "## no slot (1)",
        "## timed out after 60s (1)",
    ]
    assert "done.com" not in text and "ok.com" not in text
    assert failures_markdown([outcomes()[0]]) is None


def test_table_rows_put_each_value_in_its_column() -> None:
    """The summary table artifact: one row per site, in order, with every column."""
    rows = table_rows(outcomes())
    assert [row["site"] for row in rows] == [r.site for r in outcomes()]
    assert rows[0] == {
        "site": "ok.com",
        "status": "succeeded",
        "attempts": 1,
        "exit_code": 0,
        "duration_s": 1.23,
        "error": "",
        "cause": "",
        "last_stderr": "",
        "result": '{"records":9}',
        "check": "ok",
        "check_field": "records",
        "check_value": 9,
        "timeout_s": None,
        "peak_rss_mb": None,
        "cpu_s": None,
    }
    assert rows[1]["check"] == "records = 3, below min 5" and rows[1]["check_value"] == 3
    assert rows[2]["last_stderr"] == "b | c | d"  # the last 3 lines
    assert rows[2]["error"] == "exit code 3" and rows[2]["cause"] == ""
    assert rows[4]["check"] == "" and rows[4]["check_field"] is None


def test_the_plain_table_aligns_columns_and_ends_with_the_count_line() -> None:
    """format_table: a header, one row per site with each cell under its header, and the
    count line."""
    summary = build_summary("id", outcomes()[:3])
    lines = format_table(summary).splitlines()
    assert lines[0].split() == ["SITE", "STATUS", "ATTEMPTS", "EXIT", "SECONDS", "ERROR"]
    status_at = lines[0].index("STATUS")
    assert [line[status_at:].split()[0] for line in lines[1:4]] == [
        "succeeded",
        "succeeded",
        "failed",
    ]
    assert lines[3].split()[:5] == ["exit.com", "failed", "3", "3", "0.50"]
    assert lines[3].endswith("exit code 3")
    assert lines[-1] == "Failed: 2/3 succeeded, 1 failed, 0 timed out, 0 cancelled, 0 skipped"


def test_summary_state_and_the_bool_view() -> None:
    """Completed only when every site succeeded or was skipped; a given state wins; the
    dict[site, bool] view is True for succeeded and skipped only."""
    reports = outcomes()
    assert build_summary("id", reports)["state"] == "Failed"
    assert build_summary("id", [reports[0], reports[-1]])["state"] == "Completed"
    assert build_summary("id", reports, state="Cancelled")["state"] == "Cancelled"
    summary = build_summary("id", reports)
    assert summary["flow_run_id"] == "id"
    assert summary["sites"][0]["duration_s"] == 1.235  # rounded to ms
    assert "stderr_tail" not in summary["sites"][2] and "kind" not in summary["sites"][8]
    bools = as_bools(summary)
    assert [site for site, ok in bools.items() if ok] == ["ok.com", "warn.com", "done.com"]


def test_failure_and_warning_messages_name_sites_up_to_a_limit() -> None:
    """`k of n sites failed: k × <group> (a, b, ... and N more)`; warnings the same way."""  # noqa: RUF002
    many = [SiteReport(f"s{n}", "failed", 1, 1, 0.0) for n in range(12)]
    assert failure_message(many, shown=10) == (
        "12 of 12 sites failed: 12 \N{MULTIPLICATION SIGN} exit code 1 "
        "(s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, and 2 more)"
    )
    assert failure_message(many[:2]) == (
        "2 of 2 sites failed: 2 \N{MULTIPLICATION SIGN} exit code 1 (s0, s1)"
    )
    assert warning_message(outcomes()) == (
        "1 result check warning: warn.com (records = 3, below min 5)"
    )
    assert warning_message(outcomes()[:1]) is None


def test_count_progress_and_compact_lines() -> None:
    """The count line, the progress line, and a result cut to its width with an ellipsis."""
    summary = build_summary("id", outcomes())
    assert count_line(summary) == (
        "Failed: 2/10 succeeded, 5 failed, 1 timed out, 1 cancelled, 1 skipped"
    )
    assert progress_line(7, 10, 1) == "7/10 sites done: 6 succeeded, 1 failed"
    assert compact_result(None) == ""
    assert compact_result({"a": "é"}) == '{"a":"é"}'
    cut = compact_result({"text": "x" * 200}, width=20)
    assert len(cut) == 20 and cut.endswith("…") and cut.startswith('{"text":"xxx')
    assert compact_result({"n": 1}, width=7) == '{"n":1}'


def test_the_edges_of_each_message() -> None:
    """Defaults and edges: ten names by default, plural only above one, exactly at the
    limit no "and more", an exit code 0 that failed is an exit code (not a signal), a
    cut at 120 characters by default, values JSON can't encode shown as text."""
    eleven = [SiteReport(f"s{n}", "failed", 1, 1, 0.0) for n in range(11)]
    assert failure_message(eleven).endswith("s9, and 1 more)")  # type: ignore[union-attr]
    assert failure_message(eleven[:10]).endswith("s8, s9)")  # type: ignore[union-attr]
    warned = [SiteReport(f"w{n}", "succeeded", 1, 0, 0.0, check=CHECK_FAILED) for n in range(11)]
    assert warning_message(warned[:2]) == (
        "2 result check warnings: w0 (records = 3, below min 5), w1 (records = 3, below min 5)"
    )
    assert warning_message(warned).endswith("w9 (records = 3, below min 5), and 1 more")  # type: ignore[union-attr]
    assert warning_message(warned[:10]).endswith("w9 (records = 3, below min 5)")  # type: ignore[union-attr]
    assert failure_kind(SiteReport("z", "failed", 1, 0, 0.0)) == "exit code 0"
    assert compact_result({"n": 1, "m": 2}) == '{"n":1,"m":2}'
    assert compact_result({"when": {1, 2}}) == '{"when":"{1, 2}"}'
    exactly = {"k": "x" * 112}  # 120 characters as JSON
    assert compact_result(exactly) == '{"k":"' + "x" * 112 + '"}'
    assert compact_result({"k": "x" * 113}).endswith("…")


def test_the_markdown_and_the_plain_table_exactly() -> None:
    """One failed site: the whole failures markdown; a row with no exit code and no error
    has empty cells and no trailing spaces."""
    assert failures_markdown([SiteReport("a", "failed", 2, None, 0.0, None)]) == (
        "# Failed sites by cause\n\n## crashed (1)\n\n- `a` after 2 attempt(s): \n"
    )
    table = format_table(build_summary("id", [SiteReport("a", "cancelled", 0, None, 0.0)]))
    assert table.splitlines()[1] == "a     cancelled  0               0.00"
    assert not any(line.endswith(" ") for line in table.splitlines())
