"""Site health, read from the recorded summary rows: outcome strips, sparklines, streaks.

Plain Python. The input is what `flows.engine.baselines.summary_tables` returns: each flow
run's summary table rows (`flows.report.table_rows`), newest run first; the current run's
rows go first when it is known. A site appears at most once per run.

- A site's **outcome** in one run is its row's `status`, or `check_failed` when its result
  check did not pass (the `check` cell is neither empty nor `ok`), whatever `on_fail` said.
- Its **streak** is how many of its most recent runs in a row it did not succeed: a run it
  `failed` or `timed_out` in adds one, a run it `succeeded` in ends the count. `cancelled`
  and `skipped` runs say nothing about the site (it was stopped, or not run because it had
  already succeeded) and are passed over. A result check warning (`on_fail: warn`) ends
  the count too: the site succeeded.
- A site is **degrading** when its streak is `DEGRADING` (3) or more.
- A **sparkline** has one character per value, oldest first: the smallest value is `▁`, the
  largest `█`, the others in between by linear scale; a missing value is a blank.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Row = Mapping[str, Any]
"""One site's row of a summary table."""

DEGRADING = 3
"""A streak this long or longer: the site is degrading (listed first, named first)."""

WINDOW = 14
"""How many of a site's last runs the health artifact shows."""

SYMBOLS: dict[str, str] = {
    "succeeded": "✓",
    "failed": "✗",
    "timed_out": "◷",
    "check_failed": "⚠",
    "cancelled": "⊘",
    "skipped": "↷",
}
"""The strip's symbol for each outcome; `?` for an outcome not listed here. Each is in DejaVu
Sans (and Windows' and macOS's symbol fonts): the UI's font has none of them, and a symbol
that no installed font has shows as an empty box there (`⏱` did, on Debian's Chromium);
tests/e2e/test_ui_browser.py checks each renders."""

LEGEND = (
    "✓ succeeded · ✗ failed · ◷ timed out · ⚠ result check failed · ⊘ cancelled · "
    "↷ skipped (succeeded earlier)"
)

BARS = "▁▂▃▄▅▆▇█"
_FLAT = BARS[3]  # every value the same: a level line, neither low nor high

_NOT_JUDGED = frozenset({"cancelled", "skipped"})
_FAILED = frozenset({"failed", "timed_out"})


def outcome(row: Row) -> str:
    """The row's outcome: its status, or `check_failed` when its result check did not pass."""
    check = row.get("check")
    if check not in (None, "", "ok"):
        return "check_failed"
    return str(row.get("status"))


def strip(outcomes: Iterable[str]) -> str:
    """The outcomes (oldest first) as one symbol each."""
    return "".join(SYMBOLS.get(value, "?") for value in outcomes)


def sparkline(values: Sequence[float | None]) -> str:
    """One bar per value (oldest first): min `▁`, max `█`, linear between; None a blank."""
    known = [value for value in values if value is not None]
    if not known:
        return " " * len(values)
    low, high = min(known), max(known)
    top = len(BARS) - 1
    bars = []
    for value in values:
        if value is None:
            bars.append(" ")
        elif high == low:
            bars.append(_FLAT)
        else:
            bars.append(BARS[min(top, round((value - low) / (high - low) * top))])
    return "".join(bars)


def span(values: Iterable[float | None], unit: str = "") -> str:
    """What a sparkline's `▁` and `█` stand for: `0.4 to 2.5 s`, one value when all are the
    same (`5`), or empty when there is none."""
    known = [value for value in values if value is not None]
    if not known:
        return ""
    low, high = min(known), max(known)
    text = f"{low:.3g}" if low == high else f"{low:.3g} to {high:.3g}"
    return f"{text} {unit}" if unit else text


def streak(rows_newest_first: Iterable[Row]) -> int:
    """How many runs in a row the site did not succeed, newest first (module docstring)."""
    count = 0
    for row in rows_newest_first:
        status = row.get("status")
        if status in _NOT_JUDGED:
            continue
        if status not in _FAILED:
            break
        count += 1
    return count


def rows_by_site(sites: Iterable[str], tables: Iterable[Sequence[Row]]) -> dict[str, list[Row]]:
    """Each of `sites`' rows, newest run first (one per run); a site with none has []."""
    found: dict[str, list[Row]] = {site: [] for site in sites}
    for rows in tables:
        seen: set[str] = set()
        for row in rows:
            site = row.get("site")
            if isinstance(site, str) and site in found and site not in seen:
                seen.add(site)
                found[site].append(row)
    return found


FIELDS = ("site", "status", "check", "duration_s", "check_value")
"""The fields of a summary row that health reads."""


def compact(tables: Iterable[Sequence[Row]], keep: int = WINDOW) -> list[list[Row]]:
    """The part of `tables` (newest run first) that every site's health needs, in the same
    shape: each site's newest `keep` rows, and older ones only while its streak goes on,
    each cut to `FIELDS`; runs left with no row are dropped. A site's `site_health` (with a
    window up to `keep`) is the same over the result as over `tables`: what a run keeps
    from its one history query until its end, in a few rows per site, not 200 runs."""
    kept: dict[str, int] = {}
    ended: set[str] = set()
    found: list[list[Row]] = []
    for rows in tables:
        out: list[Row] = []
        seen: set[str] = set()
        for row in rows:
            site = row.get("site")
            if not isinstance(site, str) or site in seen:
                continue
            seen.add(site)
            if kept.get(site, 0) >= keep and site in ended:
                continue
            kept[site] = kept.get(site, 0) + 1
            if row.get("status") not in _FAILED | _NOT_JUDGED:
                ended.add(site)
            out.append({name: row.get(name) for name in FIELDS})
        if out:
            found.append(out)
    return found


def streaks(sites: Iterable[str], tables: Iterable[Sequence[Row]]) -> dict[str, int]:
    """Each site's streak over `tables` (newest run first); 0 for a site never recorded."""
    return {site: streak(rows) for site, rows in rows_by_site(sites, tables).items()}


@dataclass(frozen=True)
class SiteHealth:
    """One site's row of the health artifact: sparklines, each with its `span`; `records`
    is None without result checks."""

    site: str
    outcomes: str
    durations: str
    streak: int
    records: str | None = None
    durations_span: str = ""
    records_span: str = ""

    @property
    def degrading(self) -> bool:
        return self.streak >= DEGRADING


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def site_health(
    site: str, rows_newest_first: Sequence[Row], records: bool = False, window: int = WINDOW
) -> SiteHealth:
    """The site's health from its rows: the last `window` outcomes and durations (a run it
    was not run in, `cancelled` or `skipped`, has no duration), and the result check's
    values when `records`."""
    shown = list(reversed(rows_newest_first[:window]))
    durations = [
        None if row.get("status") in _NOT_JUDGED else _number(row.get("duration_s"))
        for row in shown
    ]
    values = [_number(row.get("check_value")) for row in shown] if records else []
    return SiteHealth(
        site=site,
        outcomes=strip(outcome(row) for row in shown),
        durations=sparkline(durations),
        streak=streak(rows_newest_first),
        records=sparkline(values) if records else None,
        durations_span=span(durations, "s"),
        records_span=span(values),
    )


def health_table(
    sites: Sequence[str],
    tables: Iterable[Sequence[Row]],
    records: bool = False,
    window: int = WINDOW,
) -> list[SiteHealth]:
    """One `SiteHealth` per site: the degrading ones first (longest streak first), then the
    others, each in the order of `sites`."""
    found = rows_by_site(sites, tables)
    healths = [site_health(site, found[site], records, window) for site in sites]
    return sorted(healths, key=lambda health: -health.streak if health.degrading else 0)


def streak_text(count: int) -> str:
    """`failed 4 runs in a row`, `failed 1 run in a row`, or empty for no streak."""
    if count == 0:
        return ""
    return f"failed {count} run{'s' if count > 1 else ''} in a row"


def health_markdown(
    healths: Sequence[SiteHealth], records: str | None = None, window: int = WINDOW
) -> str:
    """The `site-pipeline-health` artifact: a markdown table, one row per `SiteHealth` in
    the order given (`health_table`'s); `records` names the result check field, and adds
    its column."""
    degrading = sum(health.degrading for health in healths)
    lines = [
        "# Site health",
        "",
        f"Each site's last {window} runs, oldest first: {LEGEND}.",
        "",
        f"{degrading} of {len(healths)} sites failed {DEGRADING} or more runs in a row.",
        "",
    ]
    header = ["site", f"last {window} runs", "streak", "duration"]
    if records is not None:
        header.append(f"`{records}`")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for health in healths:
        text = streak_text(health.streak)
        cells = [f"`{health.site}`", health.outcomes, f"**{text}**" if health.degrading else text]
        cells.append(_code(health.durations, health.durations_span))
        if records is not None:
            cells.append(_code(health.records or "", health.records_span))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _code(spark: str, span_text: str) -> str:
    """A sparkline in a code span (its blanks kept), then its span; empty when it has no
    bar at all."""
    return f"`{spark}` {span_text}" if spark.strip() else ""
