"""Site health (`flows.health`): outcome strips, sparklines and failure streaks over the
recorded summary rows; and, on a real Prefect, the `site-pipeline-health` artifact that
every run publishes, with a failing site's streak growing run by run."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows import health

Rows = list[dict[str, Any]]


def row(site: str, status: str, duration: float = 1.0, **more: Any) -> dict[str, Any]:
    """A summary table row as `flows.report.table_rows` writes it (the fields health reads)."""
    return {"site": site, "status": status, "duration_s": duration, "check": "", **more}


# --- sparklines -----------------------------------------------------------------------


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=40))
def test_a_sparkline_has_one_bar_per_value_and_spans_min_to_max(values: list[float]) -> None:
    """One character per value; when the values differ, the smallest is `▁` and the largest
    `█`; every character is a bar."""
    line = health.sparkline(values)
    assert len(line) == len(values)
    assert set(line) <= set(health.BARS)
    if min(values) < max(values):
        assert line[values.index(min(values))] == "▁"
        assert line[values.index(max(values))] == "█"


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=2, max_size=40))
def test_a_sparkline_keeps_the_order_of_the_values(values: list[float]) -> None:
    """A larger value never gets a lower bar than a smaller one."""
    line = health.sparkline(values)
    level = [health.BARS.index(bar) for bar in line]
    for i, j in itertools.permutations(range(len(values)), 2):
        if values[i] <= values[j]:
            assert level[i] <= level[j]


def test_a_sparkline_of_equal_values_is_level_and_a_missing_value_is_blank() -> None:
    """Every value the same: one middle bar each (neither low nor high); None is a blank;
    nothing at all is as many blanks."""
    assert health.sparkline([5.0, 5.0, 5.0]) == "▄▄▄"
    assert health.sparkline([1.0, None, 8.0]) == "▁ █"
    assert health.sparkline([None, None]) == "  "
    assert health.sparkline([]) == ""


def test_a_span_says_what_the_lowest_and_highest_bar_stand_for() -> None:
    """`low to high unit` in three significant digits, one value when all are the same, empty
    with no value; a missing value is left out."""
    assert health.span([0.123456, None, 2.5], "s") == "0.123 to 2.5 s"
    assert health.span([5.0, 5.0]) == "5"
    assert health.span([None]) == ""


def test_a_sparkline_scales_linearly() -> None:
    """0..7 map to the eight bars in order."""
    assert health.sparkline([float(v) for v in range(8)]) == health.BARS


# --- outcomes and strips --------------------------------------------------------------


def test_each_outcome_has_its_own_symbol_and_a_failed_check_shows_as_one() -> None:
    """succeeded ✓, failed ✗, timed out ◷, a result check that did not pass ⚠ (failed or
    only warned), cancelled ⊘, skipped ↷; an unknown status `?`."""
    rows = [
        row("a", "succeeded"),
        row("a", "failed"),
        row("a", "timed_out"),
        row("a", "failed", check="records = 0, below min 5"),
        row("a", "succeeded", check="records = 1, below min 5"),
        row("a", "succeeded", check="ok"),
        row("a", "cancelled"),
        row("a", "skipped"),
        row("a", "exploded"),
    ]
    assert health.strip(health.outcome(r) for r in rows) == "✓✗◷⚠⚠✓⊘↷?"
    for symbol in health.SYMBOLS.values():
        assert symbol in health.LEGEND


# --- streaks --------------------------------------------------------------------------


def test_a_streak_counts_the_newest_runs_in_a_row_that_did_not_succeed() -> None:
    """Newest first: failed, timed out, failed, then a success ends the count at 3; the
    failures before that success don't count."""
    rows = [row("a", s) for s in ("failed", "timed_out", "failed", "succeeded", "failed")]
    assert health.streak(rows) == 3


def test_cancelled_and_skipped_runs_neither_count_nor_end_a_streak() -> None:
    """A run that stopped the site (cancelled) or did not run it (skipped) is passed over:
    failed, cancelled, skipped, failed is a streak of 2; a site that succeeded last has 0."""
    rows = [row("a", s) for s in ("failed", "cancelled", "skipped", "failed", "succeeded")]
    assert health.streak(rows) == 2
    assert health.streak([row("a", "succeeded"), row("a", "failed")]) == 0
    assert health.streak([]) == 0


def test_a_result_check_warning_ends_a_streak_and_a_failed_check_extends_it() -> None:
    """on_fail: warn leaves the site succeeded (the count ends); on_fail: fail made it
    failed (it counts)."""
    warned = row("a", "succeeded", check="records = 1, below min 5")
    failed_check = row("a", "failed", check="records = 1, below min 5")
    assert health.streak([row("a", "failed"), warned, row("a", "failed")]) == 1
    assert health.streak([failed_check, row("a", "failed"), warned]) == 2


def test_streaks_are_per_site_over_runs_newest_first() -> None:
    """Each site's streak over the tables; a site never recorded has 0, a site missing from
    a run is judged by the runs it was in; a site twice in one table counts once."""
    tables: list[Rows] = [
        [row("a", "failed"), row("b", "succeeded"), row("a", "failed")],
        [row("a", "failed")],
        [row("a", "succeeded"), row("b", "failed")],
    ]
    assert health.streaks(["a", "b", "c"], tables) == {"a": 2, "b": 0, "c": 0}


@given(st.lists(st.sampled_from(sorted(health.SYMBOLS)), max_size=30))
def test_a_streak_never_exceeds_the_runs_that_failed(statuses: list[str]) -> None:
    """A streak is at most the number of failed or timed-out runs, and is 0 when the newest
    judged run succeeded."""
    rows = [row("a", s) for s in statuses]
    count = health.streak(rows)
    assert 0 <= count <= sum(s in ("failed", "timed_out") for s in statuses)
    judged = [s for s in statuses if s not in ("cancelled", "skipped")]
    if judged and judged[0] not in ("failed", "timed_out"):
        assert count == 0


# --- what a run keeps from its history query ------------------------------------------

statuses = st.sampled_from(["succeeded", "failed", "timed_out", "cancelled", "skipped"])
tables_strategy = st.lists(
    st.lists(
        st.builds(
            row,
            st.sampled_from(["a", "b", "c"]),
            statuses,
            st.floats(min_value=0, max_value=100),
            check_value=st.none() | st.integers(0, 50),
        ),
        max_size=4,
    ),
    max_size=40,
)


@given(tables_strategy, st.integers(1, 16))
def test_the_compact_history_gives_every_site_the_same_health(
    tables: list[Rows], keep: int
) -> None:
    """Over the compacted tables, every site's strip, sparklines and streak are what the
    full tables give (any window up to `keep`); and a site keeps its newest `keep` rows, or
    more only down to the row that ended its streak."""
    small = health.compact(tables, keep)
    sites = ["a", "b", "c", "d"]
    for window in {1, keep}:
        assert health.health_table(sites, small, True, window) == health.health_table(
            sites, tables, True, window
        )
    full = health.rows_by_site(sites, tables)
    for site, rows in health.rows_by_site(sites, small).items():
        ends = [i for i, r in enumerate(full[site]) if r["status"] == "succeeded"]
        needed = ends[0] + 1 if ends else len(full[site])
        assert len(rows) == min(len(full[site]), max(keep, needed))


def test_the_compact_history_drops_what_health_does_not_read() -> None:
    """Old runs of a site that succeeded since are dropped (a run left empty goes), and
    each kept row has only the fields health reads."""
    tables: list[Rows] = [
        [row("a", "failed", result="{...}", last_stderr="boom")],
        [row("a", "succeeded")],
        [row("a", "failed")],
    ]
    small = health.compact(tables, keep=1)
    assert small == [
        [{"site": "a", "status": "failed", "check": "", "duration_s": 1.0, "check_value": None}],
        [{"site": "a", "status": "succeeded", "check": "", "duration_s": 1.0, "check_value": None}],
    ]


# --- the health table and its markdown ------------------------------------------------


def test_a_site_s_health_shows_its_last_runs_oldest_first() -> None:
    """The strip and the duration sparkline are the last `window` runs, oldest first; a
    cancelled run has no duration bar; records only when asked for."""
    rows = [  # newest first
        row("a", "failed", 4.0, check_value=None),
        row("a", "cancelled", 0.0),
        row("a", "succeeded", 1.0, check_value=10),
        row("a", "succeeded", 2.0, check_value=20),
        row("a", "timed_out", 9.0),
    ]
    shown = health.site_health("a", rows, records=True, window=4)
    assert shown.outcomes == "✓✓⊘✗"
    assert shown.durations == "▃▁ █"
    assert shown.records == "█▁  "
    assert (shown.durations_span, shown.records_span) == ("1 to 4 s", "10 to 20")
    assert shown.streak == 1  # the window is for showing; the streak reads every run
    plain = health.site_health("a", rows)
    assert (plain.records, plain.records_span) == (None, "")


def test_degrading_sites_come_first_longest_streak_first_then_the_config_order() -> None:
    """Sites with a streak of 3 or more lead (the longest first); the others keep the order
    of the sites given, whatever their streak."""
    tables: list[Rows] = [
        [
            row("ok", "succeeded"),
            row("two", "failed"),
            row("three", "failed"),
            row("four", "failed"),
        ]
        for _ in range(2)
    ] + [[row("three", "failed"), row("four", "failed")], [row("four", "failed")]]
    healths = health.health_table(["ok", "two", "three", "four"], tables)
    assert [h.site for h in healths] == ["four", "three", "ok", "two"]
    assert [h.records for h in healths] == [None] * 4  # records only when asked for


def test_the_markdown_has_a_legend_a_row_per_site_and_bold_degrading_streaks() -> None:
    """The artifact's text: the legend, how many sites are degrading, one table row per
    site, a degrading streak in bold, a short one plain, the records column when a result
    check field is named."""
    good = row("good", "succeeded", check_value=7)
    tables: list[Rows] = [  # newest first
        [row("bad", "failed"), row("meh", "failed"), good],
        [row("bad", "failed"), row("meh", "succeeded"), good],
        [row("bad", "failed"), good],
    ]
    healths = health.health_table(["good", "meh", "bad"], tables, records=True)
    text = health.health_markdown(healths, records="records")
    assert health.LEGEND in text
    assert "1 of 3 sites failed 3 or more runs in a row." in text
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in lines] == ["bad", "good", "meh"]
    assert "**failed 3 runs in a row**" in lines[0]
    assert "| ✓✓✓ |" in lines[1] and "| `▄▄▄` 1 s | `▄▄▄` 7 |" in lines[1]
    assert "| ✓✗ | failed 1 run in a row |" in lines[2] and "**" not in lines[2]
    assert "| `records` |" in text
    assert "`records`" not in health.health_markdown(healths)


def test_the_markdown_is_exactly_this() -> None:
    """The whole artifact for a degrading site with records and a site with no bar at all
    (its one run cancelled, no check value): the empty cells stay empty."""
    healths = [
        health.SiteHealth("bad", "✗✗✗", "▁▁█", 3, "▁█ ", "1 to 2 s", "5 to 9"),
        health.SiteHealth("off", "⊘", " ", 0, None),
    ]
    assert health.health_markdown(healths, records="pages", window=3) == (
        "# Site health\n"
        "\n"
        f"Each site's last 3 runs, oldest first: {health.LEGEND}.\n"
        "\n"
        "1 of 2 sites failed 3 or more runs in a row.\n"
        "\n"
        "| site | last 3 runs | streak | duration | `pages` |\n"
        "|---|---|---|---|---|\n"
        "| `bad` | ✗✗✗ | **failed 3 runs in a row** | `▁▁█` 1 to 2 s | `▁█ ` 5 to 9 |\n"
        "| `off` | ⊘ |  |  |  |\n"
    )


def test_the_streak_text_says_how_many_runs_in_a_row() -> None:
    """`failed N runs in a row` from N = 1 (singular), empty for none."""
    assert health.streak_text(0) == ""
    assert health.streak_text(1) == "failed 1 run in a row"
    assert health.streak_text(4) == "failed 4 runs in a row"


# --- on a real Prefect ----------------------------------------------------------------


def health_text(flow_run_id: str) -> str:
    """The `site-pipeline-health` artifact of that flow run (there is exactly one)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    from flows.names import HEALTH_KEY

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[HEALTH_KEY]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]),
            )
        )
    assert len(artifacts) == 1, artifacts
    (artifact,) = artifacts
    assert artifact.type == "markdown"
    assert isinstance(artifact.data, str)
    return artifact.data


def site_line(text: str, site: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| `{site}`"))


@pytest.mark.usefixtures("prefect_api")
def test_each_run_publishes_site_health_and_a_failing_site_s_streak_grows(
    tmp_path: Path,
) -> None:
    """Three runs of a good site and a failing one: each run has a health artifact; after
    the second the failing site reads `failed 2 runs in a row` with two ✗, after the third
    it is degrading (bold, listed first) and the run's Failed message names it; the good
    site has ✓✓✓, no streak, and its records (the result check field) as a level line."""
    from flows.site_pipeline import run_sites
    from tests.conftest import write_config

    tag = uuid4().hex[:8]
    ok, bad = f"ok-{tag}", f"fail-{tag}"
    config = write_config(
        tmp_path,
        [ok, bad],
        retry_count=1,
        result_checks={"field": "records", "min": 1},
        env={"FAKE_RECORDS": "5"},
    )
    texts: list[str] = []
    messages: list[str] = []
    for _ in range(3):
        state = run_sites(config_path=str(config), return_state=True)
        summary = state.result(raise_on_failure=False)
        assert isinstance(summary, dict)
        texts.append(health_text(summary["flow_run_id"]))
        messages.append(state.message or "")
    assert "| ✗ |" in site_line(texts[0], bad)
    second = site_line(texts[1], bad)
    assert "| ✗✗ |" in second and "failed 2 runs in a row" in second and "**" not in second
    third = texts[2]
    assert site_line(third, bad).count("**failed 3 runs in a row**") == 1
    rows = [line for line in third.splitlines() if line.startswith("| `")]
    assert rows[0].startswith(f"| `{bad}`") and rows[1].startswith(f"| `{ok}`")
    assert "| ✓✓✓ |  |" in site_line(third, ok)
    assert "| `records` |" in third and site_line(third, ok).endswith("| `▄▄▄` 5 |")
    assert "1 of 2 sites failed 3 or more runs in a row." in third
    assert bad in messages[2]
