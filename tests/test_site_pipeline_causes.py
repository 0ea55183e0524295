"""The cause of a real Python exception, end to end: a real flow run on a real Prefect API,
with pipelines that raise real exceptions, ends with the cause in the summary, in the
table and failures artifacts, and in the flow run's Failed message."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.failure_causes import cause_lines_of
from flows.names import FAILURES_KEY, SUMMARY_KEY
from flows.site_pipeline import run_sites
from tests.conftest import ROOT, write_config

pytestmark = pytest.mark.usefixtures("prefect_api")

FAKE = ROOT / "tests" / "support" / "fakes" / "grouped_errors_pipeline.py"
NOPKG = "ModuleNotFoundError: No module named 'nopkg_grouped'"


def artifacts_of(flow_run_id: str) -> dict[str, Any]:
    """The flow run's artifacts' data, by key."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])
            )
        )
    return {str(artifact.key): artifact.data for artifact in artifacts}


def test_a_real_exception_is_the_cause_in_the_summary_the_artifacts_and_the_message(
    tmp_path: Path,
) -> None:
    """Two sites hit a ModuleNotFoundError, two a chained RuntimeError that differs only in a
    pid, one succeeds: each failed site's error and cause name its exception; the failures
    artifact and the console lines group them by cause, biggest first; the table artifact
    has the cause; the Failed message names both groups."""
    # Names of this run only: a site's streak of failed runs comes from the session API's
    # history, where other tests' `pyerr-a` may have failed 3 times (a CI run's message then
    # began "failing 3+ runs in a row: pyerr-a (3)").
    tag = uuid4().hex[:6]
    names = ("pyerr-a", "chained-b", "ok-c", "pyerr-d", "chained-e")
    a, b, c, d, e = (f"{name}-{tag}" for name in names)
    sites = [a, b, c, d, e]
    config = write_config(
        tmp_path, sites, retry_count=1, command=["{python}", str(FAKE), "--site", "{site}"]
    )
    state = run_sites(config_path=str(config), return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), f"flow ended {state.name}: {state.message}"
    rows = {row["site"]: row for row in summary["sites"]}
    assert rows[c]["status"] == "succeeded" and rows[c]["cause"] is None
    for site in (a, d):
        assert rows[site]["cause"] == NOPKG
        assert rows[site]["error"] == f"exit code 1: {NOPKG}"
    for site in (b, e):
        assert re.fullmatch(r"RuntimeError: worker \d+ gave up", rows[site]["cause"])
        assert rows[site]["error"] == f"exit code 1: {rows[site]['cause']}"
    for row in rows.values():  # the logs, where the attempt logs were written
        assert all(Path(path).is_file() for path in row["logs"])

    assert cause_lines_of(summary) == [  # as big: by fingerprint
        f"2 sites: {NOPKG} ({a}, {d})",
        f"2 sites: {rows[b]['cause']} ({b}, {e})",
    ]
    assert state.is_failed()
    assert (state.message or "").startswith(
        f"4 of 5 sites failed: 2 \N{MULTIPLICATION SIGN} {NOPKG} ({a}, {d}); "
        f"2 \N{MULTIPLICATION SIGN} {rows[b]['cause']} ({b}, {e})"
    ), state.message

    artifacts = artifacts_of(summary["flow_run_id"])
    failures = str(artifacts[FAILURES_KEY])
    assert f"## `{NOPKG}` (2)" in failures  # a code span: the name holds '_'
    assert f"- `{a}` after 1 attempt(s): exit code 1: {NOPKG}" in failures
    assert f"- `{d}` after 1 attempt(s): exit code 1: {NOPKG}" in failures
    assert f"`{b}`" in failures and f"`{e}`" in failures
    assert failures.count("\n## ") == 2  # two groups, not four
    table = artifacts[SUMMARY_KEY]
    table_rows = json.loads(table) if isinstance(table, str) else table
    by_site = {row["site"]: row for row in table_rows}
    assert by_site[a]["cause"] == NOPKG
    assert by_site[a]["error"] == f"exit code 1: {NOPKG}"
    assert NOPKG in by_site[a]["last_stderr"]
