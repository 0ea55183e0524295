"""Failed sites grouped by cause: the fingerprint of a cause, the failure causes, and what
people read of them: one line per cause after the CLI's table (`cause_lines`), the flow
run's Failed message (`failure_message`) and the failures artifact (`failures_markdown`).

A cause's key is the fingerprint of its sites' cause (`fingerprint`), else a kind of failure
(`failure_kind`: `exit code 1`, `timed out`, `no slot`, ...); see `failure_causes`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flows.report import OK_STATUSES, SiteReport, cut, reports_of


def failure_kind(report: SiteReport) -> str:
    """The cause a failed site is counted under in the error aggregation."""
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
class FailureCause:
    """Failed sites that share a cause: `key` tells them (a fingerprint, or a kind),
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


def failure_causes(reports: Iterable[SiteReport]) -> list[FailureCause]:
    """The sites that did not succeed (nor were skipped), grouped by `_failure_key`: the biggest
    cause first, then by key; each cause's label is its first site's."""
    labels: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for report in reports:
        if report.status in OK_STATUSES:
            continue
        key, label = _failure_key(report)
        labels.setdefault(key, label)
        members.setdefault(key, []).append(report.site)
    return [
        FailureCause(key, labels[key], sites)
        for key, sites in sorted(members.items(), key=lambda item: (-len(item[1]), item[0]))
    ]


def _names(sites: Sequence[str], shown: int) -> str:
    """`a, b, c` or `a, b, and 3 more`."""
    more = f", and {len(sites) - shown} more" if len(sites) > shown else ""
    return ", ".join(sites[:shown]) + more


def cause_lines(reports: Iterable[SiteReport], shown: int = 5) -> list[str]:
    """One line per failure cause, biggest first, for the console after the table:
    `2 sites: ModuleNotFoundError: No module named 'nopkg' (pyerr-a, pyerr-b)`, with
    "and N more" past `shown` names."""
    return [
        f"{len(g.sites)} site{'s' if len(g.sites) > 1 else ''}: {g.label} "
        f"({_names(g.sites, shown)})"
        for g in failure_causes(reports)
    ]


def cause_lines_of(summary: Mapping[str, Any], shown: int = 5) -> list[str]:
    """`cause_lines` of a summary dict (what the CLI has)."""
    return cause_lines(reports_of(summary), shown)


MESSAGE_CAUSES = 3  # failure causes named in the flow run's message
MESSAGE_LABEL = 100  # characters of a cause's label in the message
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
    `MESSAGE_CAUSES` failure causes (`failure_causes`), each label cut at `MESSAGE_LABEL`
    characters, each with up to `shown` names; then how many other causes there are."""  # noqa: RUF002
    causes = failure_causes(reports)
    if not causes:
        return None
    failed = {site for g in causes for site in g.sites}
    parts: list[str] = []
    long_runs = sorted(
        ((site, n) for site, n in (streaks or {}).items() if n >= STREAK_NAMED and site in failed),
        key=lambda item: (-item[1], item[0]),
    )
    if long_runs:
        named = [f"{site} ({n})" for site, n in long_runs]
        parts.append(f"failing {STREAK_NAMED}+ runs in a row: {_names(named, shown)}")
    for g in causes[:MESSAGE_CAUSES]:
        label = cut(g.label, MESSAGE_LABEL)
        parts.append(f"{len(g.sites)} {TIMES} {label} ({_names(g.sites, shown)})")
    rest = causes[MESSAGE_CAUSES:]
    if rest:
        others = sum(len(g.sites) for g in rest)
        parts.append(
            f"{len(rest)} more cause{'s' if len(rest) > 1 else ''} "
            f"({others} site{'s' if others > 1 else ''})"
        )
    text = f"{len(failed)} of {len(reports)} sites failed: " + "; ".join(parts)
    return cut(" ".join(text.split()), MESSAGE_MAX)


def failures_markdown(reports: Sequence[SiteReport]) -> str | None:
    """Failed sites grouped by cause (`failure_causes`: biggest first), as markdown; each
    site with its attempts and its error (else its last stderr line); None when nothing
    failed."""
    by_site = {r.site: r for r in reports}
    causes = failure_causes(reports)
    if not causes:
        return None
    lines = ["# Failed sites by cause", ""]
    for cause in causes:
        lines.append(f"## {_code(cause.label)} ({len(cause.sites)})")
        lines.append("")
        for site in cause.sites:
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
