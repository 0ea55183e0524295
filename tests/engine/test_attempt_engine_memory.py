"""`memory_limit` and each site's usage (peak RSS, CPU seconds) on a real flow (the Prefect
test harness, real pipelines: `tests/support/fakes/hog.py`): the limit's resolution and wiring, the
summary JSON, the table artifact, `history --site`, `validate` and the bad-input errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

from flows import ops
from flows.config import load_plan
from flows.names import SUMMARY_KEY
from flows.ops.run_history import history_rows
from flows.report import SiteReport, attempt_usage, table_rows, with_usage
from flows.site_pipeline import run_sites
from tests.conftest import cli_in_process, write_config

HOG = Path(__file__).resolve().parents[1] / "support" / "fakes" / "hog.py"


def hog_config(folder: Path, sites: list[Any], **pipeline: Any) -> Path:
    """A config whose sites run the hog; each site's `flags` say what it takes."""
    command = ["{python}", str(HOG), "--site", "{site}"]
    return write_config(folder, sites, command=command, default_flags=[], **pipeline)


def summary_table(flow_run_id: str) -> dict[str, dict[str, Any]]:
    """The flow run's summary table artifact's rows, by site."""
    with get_client(sync_client=True) as client:
        (table,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]),
                key=ArtifactFilterKey(any_=[SUMMARY_KEY]),
            )
        )
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    return {row["site"]: row for row in rows}


@pytest.mark.slow  # about 10 s: two sites stopped over memory, one retried
@pytest.mark.usefixtures("prefect_api")
def test_a_run_stops_sites_over_memory_retries_them_and_reports_every_site_s_usage(
    tmp_path: Path,
) -> None:
    """Global memory_limit 150 MB. A site with its own 200 MB limit whose tree takes 240 MB
    (120 MB each in the pipeline and its child) is stopped at `> 200 MB` (its own limit, not
    the global one), retried, and ends timed_out after 2 attempts; a site without its own
    limit that takes 200 MB is stopped at `> 150 MB`; a site with its own 1000 MB limit that
    takes 200 MB and burns 0.5 s of CPU succeeds. The summary has each site's peak RSS (the
    largest of its attempts), CPU seconds (their sum) and `usage` per attempt; the table
    artifact and `history --site` show the same numbers."""
    tag = uuid4().hex[:6]
    over, by_global, big = f"over-{tag}", f"global-{tag}", f"big-{tag}"
    sites = [
        {
            "site": over,
            "memory_limit": 200,
            "retry_count": 2,
            "flags": ["--mb", "120", "--child-mb", "120", "--hold", "60"],
        },
        {"site": by_global, "flags": ["--mb", "200", "--hold", "60"]},
        {
            "site": big,
            "memory_limit": 1000,
            "flags": ["--mb", "200", "--burn", "0.5", "--hold", "0.5"],
        },
    ]
    config = hog_config(tmp_path, sites, memory_limit=150, kill_grace_seconds=0.5)
    state = run_sites(config_path=str(config), return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), state.message
    rows = {row["site"]: row for row in summary["sites"]}

    stopped = rows[over]
    assert (stopped["status"], stopped["attempts"]) == ("timed_out", 2), stopped
    assert re.fullmatch(r"over memory: \d+ MB > 200 MB", stopped["error"]), stopped["error"]
    assert stopped["stopped_by"] == "memory"  # the status as data, not only message text
    assert [entry["attempt"] for entry in stopped["usage"]] == [1, 2]
    assert all(entry["peak_rss_mb"] > 200 for entry in stopped["usage"])
    assert stopped["peak_rss_mb"] == max(entry["peak_rss_mb"] for entry in stopped["usage"])
    assert stopped["cpu_s"] == round(sum(entry["cpu_s"] for entry in stopped["usage"]), 2)
    assert len(stopped["logs"]) == 2  # both attempts ran

    assert rows[by_global]["status"] == "timed_out"
    assert re.fullmatch(r"over memory: \d+ MB > 150 MB", rows[by_global]["error"])

    ok = rows[big]
    assert ok["status"] == "succeeded", ok["error"]
    assert 190 <= ok["peak_rss_mb"] < 1000 and ok["cpu_s"] >= 0.3
    assert ok["usage"] == [{"attempt": 1, "peak_rss_mb": ok["peak_rss_mb"], "cpu_s": ok["cpu_s"]}]

    table = summary_table(summary["flow_run_id"])
    for site in (over, by_global, big):
        assert (table[site]["peak_rss_mb"], table[site]["cpu_s"]) == (
            rows[site]["peak_rss_mb"],
            rows[site]["cpu_s"],
        )

    shown = ops.history(limit=5, site=big)
    (run,) = shown["runs"]
    assert (run["peak_rss_mb"], run["cpu_s"]) == (ok["peak_rss_mb"], ok["cpu_s"])
    text = ops.format_history(shown)
    assert "PEAK MB" in text and "CPU S" in text
    assert f"{ok['peak_rss_mb']:.1f}" in text and f"{ok['cpu_s']:.2f}" in text


def test_a_site_s_own_memory_limit_overrides_the_global_one(tmp_path: Path) -> None:
    """Resolved per site: its own entry's limit, else `pipeline.memory_limit`, else None; a
    site given on the command line keeps its config entry's limit."""
    sites = [{"site": "own", "memory_limit": 800}, "plain"]
    plan = load_plan(write_config(tmp_path, sites, memory_limit=300))
    assert (plan.site("own").memory_limit, plan.site("plain").memory_limit) == (800, 300)
    assert plan.site("not-listed").memory_limit == 300
    given = load_plan(write_config(tmp_path, sites, memory_limit=300), sites=["own"])
    assert given.site("own").memory_limit == 800
    assert load_plan(write_config(tmp_path, ["a"])).site("a").memory_limit is None


@pytest.mark.usefixtures("prefect_api")
def test_the_site_s_limit_reaches_its_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `run_site` task passes the site's resolved limit to `run_attempt` (its own for
    one site, the global for the other)."""
    from flows.engine import attempt_engine
    from flows.process.attempt import run_attempt

    seen: dict[str, float | None] = {}

    def recording(argv: list[str], **options: Any) -> Any:
        seen[argv[argv.index("--site") + 1]] = options["memory_limit"]
        return run_attempt(argv, **options)

    monkeypatch.setattr(attempt_engine, "run_attempt", recording)
    sites = [{"site": "own-limit", "memory_limit": 900}, "global-limit"]
    config = hog_config(tmp_path, sites, memory_limit=400)
    state = run_sites(config_path=str(config), return_state=True)
    assert isinstance(state.result(raise_on_failure=False), dict)
    assert seen == {"own-limit": 900, "global-limit": 400}


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("global", "pipeline.memory_limit = 0: expected greater than 0"),
        ("site", "pipeline.sites[0].memory_limit = -5: expected greater than 0"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_memory_limit_not_above_zero_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, expected: str, command: str
) -> None:
    """memory_limit 0 (global) or -5 (a site's): exit 2, the key and what was expected named,
    and nothing runs (no output folder)."""
    if where == "global":
        config = hog_config(tmp_path, ["a"], memory_limit=0)
    else:
        config = hog_config(tmp_path, [{"site": "a", "memory_limit": -5}])
    code, _, err = cli_in_process([command, "--config", str(config)], capsys)
    assert code == 2, err
    assert expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "output").exists()


def test_validate_shows_the_memory_limit_and_the_sites_with_their_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate` says the global limit and which sites have their own; without one,
    `no memory limit`."""
    sites = [{"site": "a", "memory_limit": 800}, "b"]
    code, out, _ = cli_in_process(
        ["validate", "--config", str(hog_config(tmp_path, sites, memory_limit=500))], capsys
    )
    assert code == 0
    assert "; memory over 500 MB (1 site their own: a 800 MB)" in out, out
    code, out, _ = cli_in_process(
        ["validate", "--config", str(hog_config(tmp_path, ["b"]))], capsys
    )
    assert code == 0 and out.count("; no memory limit") == 1, out


def test_a_report_s_usage_totals_are_the_largest_peak_and_the_cpu_sum() -> None:
    """`with_usage`: peak = the largest of the attempts' (rounded to 0.1), cpu = their sum
    (rounded to 0.01), an attempt without a sample left out of both; none at all: None.
    The JSON and the table rows carry them."""
    usage = [
        attempt_usage(1, 312.34, 1.234),
        attempt_usage(2, None, None),
        attempt_usage(3, 98.76, 2.001),
    ]
    assert usage[0] == {"attempt": 1, "peak_rss_mb": 312.3, "cpu_s": 1.23}
    report = with_usage(SiteReport("s", "failed", 3, 1, 1.0), usage)
    assert (report.peak_rss_mb, report.cpu_s) == (312.3, 3.23)
    data = report.to_json()
    assert (data["peak_rss_mb"], data["cpu_s"], data["usage"]) == (312.3, 3.23, usage)
    (row,) = table_rows([report])
    assert (row["peak_rss_mb"], row["cpu_s"]) == (312.3, 3.23)
    empty = with_usage(SiteReport("t", "skipped", 0, None, 0.0), [])
    assert (empty.peak_rss_mb, empty.cpu_s, empty.usage) == (None, None, [])


def test_history_of_a_site_shows_blank_usage_for_a_run_recorded_before_it_was() -> None:
    """`history --site`: a run whose summary row has no usage fields shows blank cells; one
    with them shows the numbers."""
    base = {
        "start_time": None,
        "state": "Completed",
        "duration_s": 1.0,
        "name": "n",
        "site_status": "succeeded",
        "cause": None,
        "succeeded": 1,
        "failed": 0,
    }
    old = {**base, "peak_rss_mb": None, "cpu_s": None}
    new = {**base, "peak_rss_mb": 412.3, "cpu_s": 8.5}
    (columns, rows), _ = history_rows({"site": "a", "runs": [new, old], "sites": []})
    peak, cpu = columns.index("peak MB"), columns.index("CPU s")
    assert (rows[0][peak], rows[0][cpu]) == ("412.3", "8.50")
    assert (rows[1][peak], rows[1][cpu]) == ("", "")
