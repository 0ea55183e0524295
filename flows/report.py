"""The run summary: one record per site (`SiteReport`), counts, and its tables. The failed
sites grouped by cause, and the messages made of the groups, are `flows.failure_causes`.

The summary's JSON shape is a contract (`--summary-json`, benchmarks, other tools)::

    {"flow_run_id": str | None, "state": "Completed" | "Failed" | "Cancelled",
     "counts": {"total", "succeeded", "failed", "timed_out", "cancelled", "skipped",
                "check_warnings"},
     "sites": [{"site", "status", "attempts", "exit_code", "duration_s", "error", "result",
                "check", "timeout_s", "cause", "logs", "peak_rss_mb", "cpu_s", "usage",
                "stopped_by"}]}

A site's record is one `SiteReport` from its task run to the summary: the task returns it
(or fails with it, `SiteAttemptFailed`), Prefect serializes it where it crosses a process (the
task run's result, Dask), and the flow reads it back from the task run's state. `to_json` is
the summary row; `from_json` reads a row back (the CLI, from the summary it was given).

`error` says what happened, with the cause when one was read from the pipeline's output
(`"exit code 1: ModuleNotFoundError: No module named 'pandas'"`); `cause` is that line alone
(a traceback's final exception line, else the last stderr line, else the last stdout line
that is not the result JSON), or None. `logs` are the paths of the site's attempt log files
in this run, in attempt order (empty when none was written).

`stopped_by` says what stopped the attempt the record comes from: `"timeout"` (it ran past
`timeout_s`), `"stall"` (no output for `pipeline.stall_timeout`) or `"memory"` (over
`memory_limit`); null when it exited by itself, never ran, or was stopped by the run (a
stopped or halted run is `cancelled`). A site `timed_out` always has one.

`timeout_s` is the attempts' timeout in seconds: learned (`pipeline.learned_timeout`) or
`pipeline.timeout`; None for a site that never started an attempt.

`check` is None unless result checks are on; then `{"field", "value", "ok", "reason"}`.

`usage` is what each attempt of the site in this run used, in attempt order:
`[{"attempt": 1, "peak_rss_mb": 412.3, "cpu_s": 8.51}, ...]`: the peak RSS (MB of 2**20
bytes, rounded to 0.1) and the CPU seconds (user + system, rounded to 0.01) of the attempt's
process tree, from the kernel's account of the reaped pipeline and its reaped descendants or
the tree's samples (every 0.2 s, the tree's RSS summed), whichever is larger
(`flows.process.attempt.cost`); either is None where neither is known (a command that did
not start). `peak_rss_mb` is the largest of the attempts'
and `cpu_s` their sum (None when no attempt has one); `usage` is empty, and both None, for a
site that ran no attempt (skipped, no slot).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from flows.config import ConfigError

SiteStatus = Literal["succeeded", "failed", "timed_out", "cancelled", "skipped"]
StoppedBy = Literal["timeout", "stall", "memory"]
STATUSES: tuple[SiteStatus, ...] = ("succeeded", "failed", "timed_out", "cancelled", "skipped")
OK_STATUSES: frozenset[str] = frozenset({"succeeded", "skipped"})
"""Not a failure. `skipped`: not run, because it succeeded in the run that this one resumed
(`site-pipeline run --retry-failed`); its `error` field says when."""


@dataclass
class SiteReport:
    """A site's final outcome. `stderr_tail` and `kind` are not part of the JSON."""

    site: str
    status: SiteStatus
    attempts: int
    exit_code: int | None
    duration_s: float
    error: str | None = None
    result: dict[str, Any] | None = None
    stderr_tail: list[str] = field(default_factory=list)
    kind: str | None = None  # the failure's group when no other field tells it ("no slot")
    check: dict[str, Any] | None = None  # the result check (flows.checks.Verdict.to_json)
    timeout_s: float | None = None  # the attempts' timeout (learned or pipeline.timeout)
    cause: str | None = None  # the cause line read from the pipeline's output
    logs: list[str] = field(default_factory=list)  # the attempt log files, in attempt order
    peak_rss_mb: float | None = None  # the largest of its attempts' (`usage`)
    cpu_s: float | None = None  # the sum of its attempts' (`usage`)
    usage: list[dict[str, Any]] = field(default_factory=list)  # per attempt, in attempt order
    stopped_by: StoppedBy | None = None  # what stopped its attempt: timeout, stall, memory

    def to_json(self) -> dict[str, Any]:
        """The summary's row of this site (without `stderr_tail` and `kind`)."""
        data = asdict(self)
        del data["stderr_tail"], data["kind"]
        data["duration_s"] = round(self.duration_s, 3)
        return data

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> SiteReport:
        """A summary row back as a report (without `kind` and `stderr_tail`, which the JSON
        does not hold); keys it does not know are ignored, missing ones take their defaults
        (a summary of an older version)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in row.items() if key in known})


def attempt_usage(attempt: int, peak_rss_mb: float | None, cpu_s: float | None) -> dict[str, Any]:
    """One entry of a report's `usage`: `{"attempt", "peak_rss_mb", "cpu_s"}`, rounded to 0.1
    MB and 0.01 s."""
    return {
        "attempt": attempt,
        "peak_rss_mb": None if peak_rss_mb is None else round(peak_rss_mb, 1),
        "cpu_s": None if cpu_s is None else round(cpu_s, 2),
    }


def with_usage(report: SiteReport, usage: Sequence[Mapping[str, Any]]) -> SiteReport:
    """`report` with its attempts' `usage` (in attempt order) and their totals: the largest
    `peak_rss_mb`, the sum of `cpu_s`, each None when no attempt has one."""
    peaks = [u["peak_rss_mb"] for u in usage if u.get("peak_rss_mb") is not None]
    cpus = [u["cpu_s"] for u in usage if u.get("cpu_s") is not None]
    report.usage = [dict(u) for u in usage]
    report.peak_rss_mb = round(max(peaks), 1) if peaks else None
    report.cpu_s = round(sum(cpus), 2) if cpus else None
    return report


def counts(reports: Iterable[SiteReport]) -> dict[str, int]:
    tally: dict[str, int] = {"total": 0, **dict.fromkeys(STATUSES, 0), "check_warnings": 0}
    for report in reports:
        tally["total"] += 1
        tally[report.status] += 1
        tally["check_warnings"] += report.status == "succeeded" and check_warned(report)
    return tally


def check_warned(report: SiteReport) -> bool:
    """The site's result failed its check, but on_fail was warn."""
    return report.check is not None and not report.check["ok"] and report.status == "succeeded"


def warning_message(reports: Sequence[SiteReport], shown: int = 10) -> str | None:
    """`2 result check warnings: a (records = 3, below min 5), b (...)`, or None."""
    warned = [r for r in reports if check_warned(r)]
    if not warned:
        return None
    named = [f"{r.site} ({r.check['reason'] if r.check else ''})" for r in warned[:shown]]
    more = f", and {len(warned) - shown} more" if len(warned) > shown else ""
    return f"{len(warned)} result check warning{'s' if len(warned) > 1 else ''}: " + (
        ", ".join(named) + more
    )


def build_summary(
    flow_run_id: str | None, reports: Sequence[SiteReport], state: str | None = None
) -> dict[str, Any]:
    """The summary dict, sites in the order given. Its state is `state` when given
    ("Cancelled"), else Completed if every site succeeded (or was skipped), else Failed."""
    tally = counts(reports)
    if state is None:
        ok = tally["succeeded"] + tally["skipped"] == tally["total"]
        state = "Completed" if ok else "Failed"
    return {
        "flow_run_id": flow_run_id,
        "state": state,
        "counts": tally,
        "sites": [report.to_json() for report in reports],
    }


def as_bools(summary: Mapping[str, Any]) -> dict[str, bool]:
    """The original executor's `dict[site, bool]` view of a summary. A `skipped` site
    succeeded in the earlier run that this one resumed: True."""
    return {entry["site"]: entry["status"] in OK_STATUSES for entry in summary["sites"]}


def progress_line(done: int, total: int, failed: int) -> str:
    """`7/10 sites done: 6 succeeded, 1 failed`."""
    return f"{done}/{total} sites done: {done - failed} succeeded, {failed} failed"


def cut(text: str, width: int) -> str:
    """`text` in at most `width` characters, with an ellipsis when it was cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def reports_of(summary: Mapping[str, Any]) -> list[SiteReport]:
    """A summary's rows back as reports (`SiteReport.from_json`)."""
    return [SiteReport.from_json(row) for row in summary["sites"]]


def _check_cell(report: SiteReport) -> str:
    """`ok`, the reason the check failed, or empty when checks are off (history reads it)."""
    if report.check is None:
        return ""
    return "ok" if report.check["ok"] else str(report.check["reason"])


def compact_result(result: Mapping[str, Any] | None, width: int = 120) -> str:
    """The pipeline's JSON status as one compact line, cut to `width` characters."""
    if result is None:
        return ""
    text = json.dumps(result, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def table_rows(reports: Sequence[SiteReport], stderr_lines: int = 3) -> list[dict[str, Any]]:
    """Rows for the Prefect table artifact, one per site: its error (with the cause), the
    cause alone, its last `stderr_lines` stderr lines ("" for none), and its peak RSS (MB)
    and CPU seconds over its attempts (`history --site` reads them)."""
    return [
        {
            "site": r.site,
            "status": r.status,
            "attempts": r.attempts,
            "exit_code": r.exit_code,
            "duration_s": round(r.duration_s, 2),
            "error": r.error or "",
            "cause": r.cause or "",
            "last_stderr": " | ".join(r.stderr_tail[-stderr_lines:]),
            "result": compact_result(r.result),
            "check": _check_cell(r),
            "check_field": r.check["field"] if r.check else None,
            "check_value": r.check["value"] if r.check else None,
            "timeout_s": r.timeout_s,
            "peak_rss_mb": r.peak_rss_mb,
            "cpu_s": r.cpu_s,
        }
        for r in reports
    ]


PLAIN_ERROR_WIDTH = 100  # characters of the error (with its cause) in the plain table


def format_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table of a summary, where the output is not a terminal; each error cut
    at `PLAIN_ERROR_WIDTH` characters (the summary JSON has it whole)."""
    header = ("SITE", "STATUS", "ATTEMPTS", "EXIT", "SECONDS", "ERROR")
    rows = [
        (
            str(s["site"]),
            str(s["status"]),
            str(s["attempts"]),
            "" if s["exit_code"] is None else str(s["exit_code"]),
            f"{s['duration_s']:.2f}",
            cut(" ".join((s["error"] or "").split()), PLAIN_ERROR_WIDTH),
        )
        for s in summary["sites"]
    ]
    return plain_table(header, rows) + "\n" + count_line(summary)


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks: the tables
    printed where the output is not a terminal (pipes, files, CI logs)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def count_line(summary: Mapping[str, Any]) -> str:
    """`Failed: 5/6 succeeded, 1 failed, 0 timed out, 0 cancelled, 0 skipped`."""
    c = summary["counts"]
    return (
        f"{summary['state']}: {c['succeeded']}/{c['total']} succeeded, {c['failed']} failed, "
        f"{c['timed_out']} timed out, {c['cancelled']} cancelled, {c['skipped']} skipped"
    )


def skipped_reports(sites: Sequence[str], skip: Mapping[str, str]) -> dict[str, SiteReport]:
    """The summary's `skipped` rows for the flow's `skip` parameter. Raises `ConfigError`
    for a site that is not in `sites`."""
    unknown = [site for site in skip if site not in sites]
    if unknown:
        raise ConfigError(
            [f"skip = {json.dumps(unknown[:5])}: expected sites of the run's site list"]
        )
    return {
        site: SiteReport(site, "skipped", 0, None, 0.0, str(note)) for site, note in skip.items()
    }
