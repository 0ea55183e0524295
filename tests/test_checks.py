"""Result checks: the rules (plain Python), then through the flow on a real Prefect API."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.checks import check_result, field_value
from flows.config import ResultChecks
from flows.site_pipeline import run_sites
from tests.conftest import write_config


def rules(**overrides: Any) -> ResultChecks:
    base: dict[str, Any] = {"field": "records", "min": 1, "drop_factor": 0.5, "window": 10}
    base.update(overrides)
    return ResultChecks(**base)


def test_a_value_below_half_the_median_fails_with_the_reason() -> None:
    """10 records against a median of 100 over 3 runs: fails, naming value, factor, median."""
    verdict = check_result({"records": 10}, rules(), [90, 100, 120])
    assert not verdict.ok and verdict.value == 10
    assert verdict.reason == "records = 10, below 0.5 x median 100 over 3 runs"


def test_a_value_at_half_the_median_passes() -> None:
    """The drop rule is strict: exactly drop_factor x median is fine."""
    assert check_result({"records": 50}, rules(), [100, 100, 100]).ok


def test_with_fewer_than_min_runs_only_min_applies() -> None:
    """Two values on record, min_runs 3: a drop is not judged yet; min still is."""
    assert check_result({"records": 2}, rules(), [100, 100]).ok
    verdict = check_result({"records": 0}, rules(), [])
    assert verdict.reason == "records = 0, below min 1"


def test_only_the_last_window_values_count() -> None:
    """window 3: the median is over the last 3 values, not all of them."""
    verdict = check_result({"records": 40}, rules(window=3), [1000, 1000, 100, 100, 100])
    assert verdict.reason == "records = 40, below 0.5 x median 100 over 3 runs"


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (None, "records missing: the pipeline printed no JSON result"),
        ({"site": "a"}, "records missing from the result"),
        ({"records": "12"}, "records = '12': not a number"),
        ({"records": True}, "records = True: not a number"),
    ],
)
def test_a_missing_or_non_number_field_fails(result: Any, reason: str) -> None:
    """No result, no field, a string or a bool: a failed check with a clear reason."""
    verdict = check_result(result, rules(), [])
    assert not verdict.ok and verdict.value is None and verdict.reason == reason


def test_dotted_paths_reach_nested_numbers() -> None:
    """`stats.records` reads {"stats": {"records": 7}}."""
    assert field_value({"stats": {"records": 7}}, "stats.records") == 7.0
    assert field_value({"stats": 7}, "stats.records") == "missing from the result"
    assert check_result({"stats": {"records": 7}}, rules(field="stats.records"), []).ok


# -- on a real Prefect API, through the flow -------------------------------------------------

CHECKS = {"field": "records", "min": 1, "drop_factor": 0.5, "window": 10, "min_runs": 3}


def run_with_records(folder: Path, site: str, records: int | None, **pipeline: Any) -> Any:
    """One flow run of `site` whose pipeline reports `records` (None: no such field)."""
    folder.mkdir(exist_ok=True)
    env = {"FAKE_RECORDS": str(records)} if records is not None else {}
    options: dict[str, Any] = {"result_checks": CHECKS, "retry_count": 3, "env": env}
    options.update(pipeline)
    state = run_sites(config_path=str(write_config(folder, [site], **options)), return_state=True)
    return state, state.result(raise_on_failure=False)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_a_drop_below_half_the_usual_fails_the_site_once_without_retry(tmp_path: Path) -> None:
    """After runs of 100, 120 and 90 records, 10 records fails the drop rule with its reason,
    in 1 attempt though 3 are allowed, grouped as "result check"; the run ends Failed."""
    site = f"ok-drop-{uuid4().hex[:6]}"
    for n, records in enumerate([100, 120, 90]):
        _, summary = run_with_records(tmp_path / f"h{n}", site, records)
        assert summary["sites"][0]["check"]["ok"] is True
    state, summary = run_with_records(tmp_path / "low", site, 10)
    entry = summary["sites"][0]
    assert entry["status"] == "failed" and entry["attempts"] == 1
    assert entry["error"] == "records = 10, below 0.5 x median 100 over 3 runs"
    assert entry["check"] == {
        "field": "records",
        "value": 10.0,
        "ok": False,
        "reason": entry["error"],
    }
    assert state.is_failed() and summary["counts"]["failed"] == 1
    failures = artifact_text(summary["flow_run_id"], "site-pipeline-failures")
    assert "## result check (1)" in failures


@pytest.mark.usefixtures("prefect_api")
def test_zero_records_fails_min_with_no_history_and_a_missing_field_only_when_on(
    tmp_path: Path,
) -> None:
    """0 records fails `min` on a site's first run; a result without the field fails when
    checks are on, and is fine when they are off."""
    _, summary = run_with_records(tmp_path / "zero", f"ok-new-{uuid4().hex[:6]}", 0)
    assert summary["sites"][0]["error"] == "records = 0, below min 1"
    _, summary = run_with_records(tmp_path / "none", f"ok-nofield-{uuid4().hex[:6]}", None)
    assert summary["sites"][0]["error"] == "records missing from the result"
    _, summary = run_with_records(
        tmp_path / "off", f"ok-off-{uuid4().hex[:6]}", None, result_checks=None
    )
    assert summary["sites"][0]["status"] == "succeeded" and summary["sites"][0]["check"] is None


@pytest.mark.usefixtures("prefect_api")
def test_warn_keeps_the_site_succeeded_and_the_summary_counts_the_warning(
    tmp_path: Path,
) -> None:
    """on_fail: warn: the site succeeds, the summary counts 1 warning, and the flow run's
    message names it."""
    site = f"ok-warn-{uuid4().hex[:6]}"
    state, summary = run_with_records(
        tmp_path / "warn", site, 0, result_checks={**CHECKS, "on_fail": "warn"}
    )
    entry = summary["sites"][0]
    assert entry["status"] == "succeeded" and entry["check"]["ok"] is False
    assert summary["counts"]["check_warnings"] == 1
    assert state.is_completed()
    assert (
        state.message == f"all 1 sites succeeded; 1 result check warning: {site} "
        "(records = 0, below min 1)"
    )


def artifact_text(flow_run_id: str, key: str) -> str:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])
            )
        )
    return str(next(a for a in artifacts if a.key == key).data)
