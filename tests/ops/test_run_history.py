"""`history` on a real Prefect API: a site's status comes from its flow run's summary
table (so a timed-out site says `timed_out`), and from its task run's state when the
flow run has no summary (yet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

from flows import ops
from flows.names import SUMMARY_KEY
from flows.site_pipeline import run_sites
from tests.conftest import write_config

pytestmark = pytest.mark.usefixtures("prefect_api")


def run_hang_and_fail(tmp_path: Path) -> tuple[str, str, str, str]:
    """Run a hanging site (timed out), a failing one and a good one; their names and the
    flow run's id."""
    tag = uuid4().hex[:8]
    hang, fail, ok = f"hang-{tag}", f"fail-{tag}", f"ok-{tag}"
    config = write_config(
        tmp_path, [hang, fail, ok], retry_count=1, timeout=1, kill_grace_seconds=0.5
    )
    state = run_sites(config_path=str(config), return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict)
    return hang, fail, ok, summary["flow_run_id"]


def statuses(data: dict[str, Any]) -> dict[str, str]:
    return {entry["site"]: entry["last_status"] for entry in data["sites"]}


def test_a_timed_out_site_shows_timed_out_and_a_failed_one_failed(tmp_path: Path) -> None:
    """After the run, `history` gives each site the status the run's summary gave it:
    `timed_out`, `failed`, `succeeded`; the run counts one success and two failures, and
    the plain table shows `timed_out` in the site's row."""
    hang, fail, ok, flow_run_id = run_hang_and_fail(tmp_path)
    data = ops.history(limit=1)
    shown = statuses(data)
    assert (shown[hang], shown[fail], shown[ok]) == ("timed_out", "failed", "succeeded")
    (run,) = data["runs"]
    assert run["flow_run_id"] == flow_run_id
    assert (run["succeeded"], run["failed"]) == (1, 2)
    row = next(line for line in ops.format_history(data).splitlines() if line.startswith(hang))
    assert row.split()[1] == "timed_out"


def test_without_a_summary_a_site_shows_its_task_run_s_state(tmp_path: Path) -> None:
    """A flow run with no summary table (a run still running has none yet): the timed-out
    site shows `failed`, its task run's state; the others are unchanged."""
    hang, fail, ok, flow_run_id = run_hang_and_fail(tmp_path)
    with get_client(sync_client=True) as client:
        tables = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[SUMMARY_KEY]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
        assert tables
        for table in tables:
            client.delete_artifact(table.id)
    shown = statuses(ops.history(limit=1))
    assert (shown[hang], shown[fail], shown[ok]) == ("failed", "failed", "succeeded")


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two runs of three sites: `fail` fails both; `late` times out in the first (it hangs)
    and succeeds in the second; `ok` succeeds both. Their names, by role."""
    tag = uuid4().hex[:8]
    names = {"ok": f"ok-{tag}", "fail": f"fail-{tag}", "late": f"late-{tag}"}
    for night in (1, 2):
        folder = tmp_path_factory.mktemp(f"night{night}")
        config = write_config(
            folder,
            list(names.values()),
            retry_count=1,
            timeout=1,
            kill_grace_seconds=0.5,
        )
        if night == 1:  # `late` hangs on the first night only
            body = yaml.safe_load(config.read_text(encoding="utf-8"))
            body["pipeline"]["env"]["FAKE_HANG"] = names["late"]
            config.write_text(yaml.safe_dump(body), encoding="utf-8")
        state = run_sites(config_path=str(config), return_state=True)
        assert isinstance(state.result(raise_on_failure=False), dict)
    return names


def test_history_shows_how_many_runs_in_a_row_each_site_failed(two_nights: dict[str, str]) -> None:
    """A site that failed both runs has a streak of 2 (`failed 2 runs in a row` in its row);
    one that failed and then succeeded, and one that always succeeded, have none."""
    data = ops.history(limit=2)
    streak = {entry["site"]: entry["streak"] for entry in data["sites"]}
    assert (streak[two_nights["fail"]], streak[two_nights["late"]], streak[two_nights["ok"]]) == (
        2,
        0,
        0,
    )
    lines = ops.format_history(data).splitlines()
    row = next(line for line in lines if line.startswith(two_nights["fail"]))
    assert row.endswith("failed 2 runs in a row")
    assert "in a row" not in next(line for line in lines if line.startswith(two_nights["ok"]))
    assert "STREAK" in ops.format_history(data)


def test_history_of_one_site_shows_its_status_and_cause_in_each_run(
    two_nights: dict[str, str],
) -> None:
    """`history --site S`: each run gives the site's status there and, when it did not
    succeed, its cause: the failing site's stderr line both nights; the late site's last
    line before its timeout on the first night, and no cause once it succeeded. The plain
    table has a CAUSE column."""
    fail = ops.history(limit=10, site=two_nights["fail"])
    assert [run["site_status"] for run in fail["runs"]] == ["failed", "failed"]
    for run in fail["runs"]:
        assert f"{two_nights['fail']}: boom on attempt 1" in run["cause"]
    late = ops.history(limit=10, site=two_nights["late"])
    newest, oldest = late["runs"]
    assert (newest["site_status"], newest["cause"]) == ("succeeded", None)
    assert oldest["site_status"] == "timed_out"
    assert oldest["cause"] == "hanging"  # the last line it printed before it was stopped
    text = ops.format_history(fail)
    assert "CAUSE" in text and "boom on attempt 1" in text


def test_an_older_row_without_a_cause_falls_back_to_its_error_then_its_stderr() -> None:
    """Summary rows recorded before causes were: the cause is the row's `error`, else its
    last stderr line; a row with neither has none."""
    from flows.ops.run_history import _cause

    assert _cause({"cause": "ImportError: x", "error": "exit code 1: ImportError: x"}) == (
        "ImportError: x"
    )
    assert _cause({"cause": "", "error": "exit code 1", "last_stderr": "a | b"}) == "exit code 1"
    assert _cause({"last_stderr": "first | last line"}) == "last line"
    assert _cause({"error": "", "last_stderr": ""}) is None
    assert _cause(None) is None


def test_a_long_cause_is_cut_to_one_line_in_the_tables() -> None:
    """A cause of 500 characters over two lines is one line of `CAUSE_WIDTH` in the table."""
    from flows.ops.run_history import CAUSE_WIDTH, history_rows

    run = {
        "start_time": None,
        "state": "Failed",
        "duration_s": 1.0,
        "site_status": "failed",
        "cause": "x" * 250 + "\n" + "y" * 250,
        "name": "n",
        "succeeded": 0,
        "failed": 1,
    }
    (columns, rows), _ = history_rows({"site": "a", "runs": [run], "sites": []})
    cell = rows[0][columns.index("cause")]
    assert len(cell) == CAUSE_WIDTH and cell.endswith("…") and "\n" not in cell


def test_the_sites_table_has_a_streak_column_only_when_a_site_has_a_streak() -> None:
    """No site failing now: no STREAK column (nothing to say); one failing 2 runs: the
    column, with `failed 2 runs in a row` in its row and nothing in the others."""
    from flows.ops.run_history import history_rows

    def sites(*streaks: int) -> dict[str, Any]:
        entries = [
            {"site": f"s{i}", "last_status": "x", "last_run_at": None, "last_succeeded_at": None}
            | {"streak": n}
            for i, n in enumerate(streaks)
        ]
        return {"runs": [], "sites": entries}

    _, (columns, rows) = history_rows(sites(0, 0))
    assert "streak" not in columns and all(len(row) == len(columns) for row in rows)
    _, (columns, rows) = history_rows(sites(0, 2))
    at = columns.index("streak")
    assert [row[at] for row in rows] == ["", "failed 2 runs in a row"]
