"""`history` on a real Prefect API: a site's status comes from its flow run's summary
table (so a timed-out site says `timed_out`), and from its task run's state when the
flow run has no summary (yet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
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
