"""The run summary: one record per site, counts, and the text a person reads.

The summary's JSON shape is a contract (`--summary-json`, benchmarks, other tools)::

    {"flow_run_id": str | None, "state": "Completed" | "Failed" | "Cancelled",
     "counts": {"total", "succeeded", "failed", "timed_out", "cancelled", "skipped",
                "check_warnings"},
     "sites": [{"site", "status", "attempts", "exit_code", "duration_s", "error", "result",
                "check", "timeout_s"}]}

`timeout_s` is the attempts' timeout in seconds: learned (`pipeline.learned_timeout`) or
`pipeline.timeout`; None for a site that never started an attempt.

`check` is None unless result checks are on; then `{"field", "value", "ok", "reason"}`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from flows.config import ConfigError

SiteStatus = Literal["succeeded", "failed", "timed_out", "cancelled", "skipped"]
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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["stderr_tail"], data["kind"]
        data["duration_s"] = round(self.duration_s, 3)
        return data


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


def failure_message(reports: Sequence[SiteReport], shown: int = 10) -> str | None:
    """`3 of 10 sites failed: a, b, c`, or None when every site succeeded (or was skipped)."""
    failed = [r.site for r in reports if r.status not in OK_STATUSES]
    if not failed:
        return None
    names = ", ".join(failed[:shown]) + (
        f", and {len(failed) - shown} more" if len(failed) > shown else ""
    )
    return f"{len(failed)} of {len(reports)} sites failed: {names}"


def progress_line(done: int, total: int, failed: int) -> str:
    """`7/10 sites done: 6 succeeded, 1 failed`."""
    return f"{done}/{total} sites done: {done - failed} succeeded, {failed} failed"


def failure_kind(report: SiteReport) -> str:
    """The group a failed site belongs to in the error aggregation."""
    if report.kind is not None:
        return report.kind
    if report.status == "timed_out":
        return "timed out"
    if report.status in ("cancelled", "skipped"):
        return report.status
    if report.exit_code is None:
        return (
            "could not start"
            if report.error and report.error.startswith("could not start")
            else "crashed"
        )
    if report.exit_code < 0:
        return f"killed by signal {-report.exit_code}"
    return f"exit code {report.exit_code}"


def failures_markdown(reports: Sequence[SiteReport]) -> str | None:
    """Failed sites grouped by kind, as markdown; None when nothing failed."""
    groups: dict[str, list[SiteReport]] = {}
    for report in reports:
        if report.status not in OK_STATUSES:
            groups.setdefault(failure_kind(report), []).append(report)
    if not groups:
        return None
    lines = ["# Failed sites by kind", ""]
    for kind, members in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        lines.append(f"## {kind} ({len(members)})")
        lines.append("")
        for report in members:
            last = report.stderr_tail[-1] if report.stderr_tail else (report.error or "")
            lines.append(f"- `{report.site}` after {report.attempts} attempt(s): {last}")
        lines.append("")
    return "\n".join(lines)


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
    """Rows for the Prefect table artifact, one per site."""
    return [
        {
            "site": r.site,
            "status": r.status,
            "attempts": r.attempts,
            "exit_code": r.exit_code,
            "duration_s": round(r.duration_s, 2),
            "last_stderr": " | ".join(r.stderr_tail[-stderr_lines:]),
            "result": compact_result(r.result),
            "check": _check_cell(r),
            "check_field": r.check["field"] if r.check else None,
            "check_value": r.check["value"] if r.check else None,
            "timeout_s": r.timeout_s,
        }
        for r in reports
    ]


def format_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table of a summary, for the terminal."""
    header = ("SITE", "STATUS", "ATTEMPTS", "EXIT", "SECONDS", "ERROR")
    rows = [
        (
            str(s["site"]),
            str(s["status"]),
            str(s["attempts"]),
            "" if s["exit_code"] is None else str(s["exit_code"]),
            f"{s['duration_s']:.2f}",
            s["error"] or "",
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
