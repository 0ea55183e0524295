"""The run summary: one record per site, counts, and the text a person reads.

The summary's JSON shape is a contract (`--summary-json`, benchmarks, other tools)::

    {"flow_run_id": str | None, "state": "Completed" | "Failed" | "Cancelled",
     "counts": {"total", "succeeded", "failed", "timed_out", "cancelled", "skipped",
                "check_warnings"},
     "sites": [{"site", "status", "attempts", "exit_code", "duration_s", "error", "result",
                "check", "timeout_s", "cause", "logs", "peak_rss_mb", "cpu_s", "usage"}]}

`error` says what happened, with the cause when one was read from the pipeline's output
(`"exit code 1: ModuleNotFoundError: No module named 'pandas'"`); `cause` is that line alone
(a traceback's final exception line, else the last stderr line, else the last stdout line
that is not the result JSON), or None. `logs` are the paths of the site's attempt log files
in this run, in attempt order (empty when none was written).

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
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
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
    cause: str | None = None  # the cause line read from the pipeline's output
    logs: list[str] = field(default_factory=list)  # the attempt log files, in attempt order
    peak_rss_mb: float | None = None  # the largest of its attempts' (`usage`)
    cpu_s: float | None = None  # the sum of its attempts' (`usage`)
    usage: list[dict[str, Any]] = field(default_factory=list)  # per attempt, in attempt order

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["stderr_tail"], data["kind"]
        data["duration_s"] = round(self.duration_s, 3)
        return data


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


def _cut(text: str, width: int) -> str:
    """`text` in at most `width` characters, with an ellipsis when it was cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


_URL_QUERY = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s?#'\"]*)[?#][^\s'\"]*")
_UUID = re.compile(r"\b[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\b")
_QUOTED_PATH = re.compile(r"'[^'\n]*[/\\][^'\n]*'|\"[^\"\n]*[/\\][^\"\n]*\"")
_BRACKETED_PATH = re.compile(r"\((?:[A-Za-z]:)?[/\\][^()]*\)")
_HEX = re.compile(
    r"\b0[xX][0-9a-fA-F]+\b|\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{8,}\b"
)
_NUMBER = re.compile(r"(?<!\w)\d+(?:[.,]\d+)*")
_EXCEPTION_HEAD = re.compile(r"[A-Za-z_][\w.]*:(?=\s|$)")


def fingerprint(cause: str) -> str:
    """The cause with its varying parts normalised, so that failures alike group together.

    A leading exception name (`ModuleNotFoundError:`, `requests.exceptions.ConnectionError:`)
    is kept as it is; in the rest, in this order:

    1. a URL's query string and fragment become `?<query>` (`https://x/a?page=2` is
       `https://x/a?<query>`);
    2. a UUID becomes `<uuid>`;
    3. a quoted string with a `/` or a `\\` in it (a path) becomes `'<path>'`, and a path
       in brackets, as ImportError prints the module's file (`(/app/x.py)`), `(<path>)`;
    4. a hex id becomes `<hex>`: `0x` then hex digits, or 8 or more hex digits with at least
       one digit and one letter a-f (`7f3a9c01`, a git sha);
    5. a number not glued to a word's end becomes `<n>` (`42`, `3.5`, `1,000`; the `2` in
       `http2` or `site2` stays);
    6. runs of blanks become one space, and the ends are trimmed.

    Other text, quoted names (`'pandas'`) included, is kept, so different exceptions or
    different missing modules never share a fingerprint. Pure: the same cause, the same
    fingerprint.
    """
    text = " ".join(cause.split())
    head_match = _EXCEPTION_HEAD.match(text)
    head = head_match.group(0) if head_match else ""
    rest = text[len(head) :]
    rest = _URL_QUERY.sub(r"\1?<query>", rest)
    rest = _UUID.sub("<uuid>", rest)
    rest = _QUOTED_PATH.sub("'<path>'", rest)
    rest = _BRACKETED_PATH.sub("(<path>)", rest)
    rest = _HEX.sub("<hex>", rest)
    rest = _NUMBER.sub("<n>", rest)
    return head + rest


@dataclass(frozen=True)
class FailureGroup:
    """Failed sites that share a cause: `key` groups them (a fingerprint, or a kind),
    `label` is what a person reads (the first site's cause), `sites` in report order."""

    key: str
    label: str
    sites: list[str]


def _failure_key(report: SiteReport) -> tuple[str, str]:
    """(key, label) of a site that did not succeed: its kind when one is set (`no slot`,
    `result check`); a cancelled one by its error (`the run halted ...`, `cancelled by
    SIGTERM`); a timed-out one by its error without the last line seen (`timed out after
    <n> s`, `stalled: no output for <n> s`); else the fingerprint of its cause; else, with
    no exit code, its error; else the kind of failure (`failure_kind`: `exit code 1`)."""
    if report.kind is None and report.check is not None and not report.check["ok"]:
        return "result check", "result check"  # a summary row: `kind` is not in the JSON
    if report.kind is not None:
        return report.kind, report.kind
    if report.status in ("cancelled", "timed_out") and not report.error:
        return failure_kind(report), failure_kind(report)
    if report.status == "cancelled":  # why: the run halted, or was stopped (SIGTERM)
        return fingerprint(str(report.error)), str(report.error)
    if report.status == "timed_out" and report.error:
        head = report.error
        if report.cause and head.endswith(f": {report.cause}"):
            head = head[: -len(report.cause) - 2]
        return fingerprint(head), head
    if report.cause:
        return fingerprint(report.cause), report.cause
    if report.exit_code is None and report.error and not report.error.startswith("could not start"):
        return fingerprint(report.error), report.error  # say more than "crashed"
    kind = failure_kind(report)
    return kind, kind


def failure_groups(reports: Iterable[SiteReport]) -> list[FailureGroup]:
    """The sites that did not succeed (nor were skipped), grouped by `_failure_key`: the biggest
    group first, then by key; each group's label is its first site's."""
    labels: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for report in reports:
        if report.status in OK_STATUSES:
            continue
        key, label = _failure_key(report)
        labels.setdefault(key, label)
        members.setdefault(key, []).append(report.site)
    return [
        FailureGroup(key, labels[key], sites)
        for key, sites in sorted(members.items(), key=lambda item: (-len(item[1]), item[0]))
    ]


def _names(sites: Sequence[str], shown: int) -> str:
    """`a, b, c` or `a, b, and 3 more`."""
    more = f", and {len(sites) - shown} more" if len(sites) > shown else ""
    return ", ".join(sites[:shown]) + more


def group_lines(reports: Iterable[SiteReport], shown: int = 5) -> list[str]:
    """One line per failure group, biggest first, for the console after the table:
    `2 sites: ModuleNotFoundError: No module named 'nopkg' (pyerr-a, pyerr-b)`, with
    "and N more" past `shown` names."""
    return [
        f"{len(g.sites)} site{'s' if len(g.sites) > 1 else ''}: {g.label} "
        f"({_names(g.sites, shown)})"
        for g in failure_groups(reports)
    ]


def reports_of(summary: Mapping[str, Any]) -> list[SiteReport]:
    """A summary's rows back as reports (without `kind` and `stderr_tail`, which the JSON
    does not hold); keys it does not know are ignored, missing ones take their defaults."""
    known = {f.name for f in fields(SiteReport)}
    return [SiteReport(**{k: v for k, v in row.items() if k in known}) for row in summary["sites"]]


def group_lines_of(summary: Mapping[str, Any], shown: int = 5) -> list[str]:
    """`group_lines` of a summary dict (what the CLI has)."""
    return group_lines(reports_of(summary), shown)


MESSAGE_GROUPS = 3  # failure groups named in the flow run's message
MESSAGE_LABEL = 100  # characters of a group's label in the message
MESSAGE_MAX = 1000  # characters of the whole message
STREAK_NAMED = 3  # failed this many runs in a row (or more): named first
TIMES = "\N{MULTIPLICATION SIGN}"


def failure_message(
    reports: Sequence[SiteReport], shown: int = 10, streaks: Mapping[str, int] | None = None
) -> str | None:
    """The flow run's Failed message, which the notifications send; None when every site
    succeeded (or was skipped). One line of at most `MESSAGE_MAX` characters::

        4 of 10 sites failed: failing 3+ runs in a row: a (5), b (3); 3 × ImportError:
        cannot import name 'x' ... (a, b, c); 1 × exit code 1 (d)

    The sites of this run that failed `STREAK_NAMED` or more runs in a row come first
    (`streaks`: site -> runs failed in a row, this one included), longest first; then the largest
    `MESSAGE_GROUPS` failure groups (`failure_groups`), each label cut at `MESSAGE_LABEL`
    characters, each with up to `shown` names; then how many other groups there are."""  # noqa: RUF002
    groups = failure_groups(reports)
    if not groups:
        return None
    failed = {site for g in groups for site in g.sites}
    parts: list[str] = []
    long_runs = sorted(
        ((site, n) for site, n in (streaks or {}).items() if n >= STREAK_NAMED and site in failed),
        key=lambda item: (-item[1], item[0]),
    )
    if long_runs:
        named = [f"{site} ({n})" for site, n in long_runs]
        parts.append(f"failing {STREAK_NAMED}+ runs in a row: {_names(named, shown)}")
    for g in groups[:MESSAGE_GROUPS]:
        label = _cut(g.label, MESSAGE_LABEL)
        parts.append(f"{len(g.sites)} {TIMES} {label} ({_names(g.sites, shown)})")
    rest = groups[MESSAGE_GROUPS:]
    if rest:
        others = sum(len(g.sites) for g in rest)
        parts.append(
            f"{len(rest)} more cause{'s' if len(rest) > 1 else ''} "
            f"({others} site{'s' if others > 1 else ''})"
        )
    text = f"{len(failed)} of {len(reports)} sites failed: " + "; ".join(parts)
    return _cut(" ".join(text.split()), MESSAGE_MAX)


def failures_markdown(reports: Sequence[SiteReport]) -> str | None:
    """Failed sites grouped by cause (`failure_groups`: biggest first), as markdown; each
    site with its attempts and its error (else its last stderr line); None when nothing
    failed."""
    by_site = {r.site: r for r in reports}
    groups = failure_groups(reports)
    if not groups:
        return None
    lines = ["# Failed sites by cause", ""]
    for group in groups:
        lines.append(f"## {_code(group.label)} ({len(group.sites)})")
        lines.append("")
        for site in group.sites:
            r = by_site[site]
            last = r.stderr_tail[-1] if r.stderr_tail and not r.cause else (r.error or "")
            lines.append(f"- `{site}` after {r.attempts} attempt(s): {last}")
        lines.append("")
    return "\n".join(lines)


_MARKDOWN = re.compile(r"[`*_\[\]<>#|\\~]")


def _code(text: str) -> str:
    """`text` as it is, or as a code span when markdown would change it (a cause's
    `__init__`, `*` or `<`)."""
    return "`" + text.replace("`", "'") + "`" if _MARKDOWN.search(text) else text


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
            _cut(" ".join((s["error"] or "").split()), PLAIN_ERROR_WIDTH),
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
