"""The flow on a real Prefect API (a temporary server) with real pipeline processes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterTaskRunId,
)
from prefect.logging.handlers import APILogWorker

from flows.report import as_bools
from flows.site_pipeline import run_sites
from tests.conftest import read_timeline, write_config
from tests.support.processes import alive
from tests.support.timeline import max_overlap

pytestmark = pytest.mark.usefixtures("prefect_api")


def run(config: Path, **params: Any) -> tuple[Any, dict[str, Any]]:
    """Run the flow; return (final state, summary dict)."""
    state = run_sites(config_path=str(config), return_state=True, **params)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), f"flow ended {state.name}: {state.message}"
    return state, summary


def site(summary: dict[str, Any], name: str) -> dict[str, Any]:
    return next(entry for entry in summary["sites"] if entry["site"] == name)


def starts(rows: list[tuple[str, str, float]], name: str) -> list[float]:
    return [when for who, what, when in rows if who == name and what == "start"]


def test_flaky_site_succeeds_on_attempt_2_and_others_are_isolated(tmp_path: Path) -> None:
    """A flaky site retries once and succeeds; an always-failing site doesn't stop the others.
    Prefect's task runs record the retries and delays the config gave (2 retries, 0.1 s and
    0.2 s) and the attempts each made."""
    config = write_config(tmp_path, ["flaky-a", "fail-b", "ok-c"], retry_count=3, retry_delay=0.1)
    state, summary = run(config)
    assert site(summary, "flaky-a")["status"] == "succeeded"
    assert site(summary, "flaky-a")["attempts"] == 2
    assert site(summary, "ok-c")["status"] == "succeeded"
    failed = site(summary, "fail-b")
    assert failed["status"] == "failed" and failed["attempts"] == 3 and failed["exit_code"] == 1
    assert len(starts(read_timeline(tmp_path), "fail-b")) == 3  # exactly retry_count processes
    assert state.is_failed()
    message = state.message or ""  # fail-b also failed in other tests: its streak may lead
    assert message.startswith("1 of 3 sites failed: "), message
    assert message.endswith("1 \N{MULTIPLICATION SIGN} fail-b: boom on attempt 3 (fail-b)")
    # What Prefect recorded for each task run: the retries and delays it was given
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(summary["flow_run_id"])]))
        )
    assert sorted(run.name for run in task_runs) == ["fail-b", "flaky-a", "ok-c"]
    for task_run in task_runs:
        assert task_run.empirical_policy.retries == 2
        assert task_run.empirical_policy.retry_delay == [0.1, 0.2]
        assert task_run.run_count == {"flaky-a": 2, "fail-b": 3, "ok-c": 1}[task_run.name]


def test_non_retryable_exit_code_runs_once(tmp_path: Path) -> None:
    """Exit code 2 is in non_retryable_exit_codes: one attempt only, though 3 are allowed."""
    config = write_config(tmp_path, ["usage-a"], retry_count=3, retry_delay=0.1)
    _, summary = run(config)
    assert site(summary, "usage-a")["attempts"] == 1
    assert site(summary, "usage-a")["exit_code"] == 2
    assert len(starts(read_timeline(tmp_path), "usage-a")) == 1


def test_unstartable_command_is_not_retried(tmp_path: Path) -> None:
    """A command that can't be started fails once with 'could not start', not retry_count times."""
    config = write_config(
        tmp_path, ["ok-a"], retry_count=3, command=[str(tmp_path / "nope"), "{site}"]
    )
    _, summary = run(config)
    entry = site(summary, "ok-a")
    assert entry["status"] == "failed" and entry["attempts"] == 1
    assert entry["error"].startswith("could not start")


@pytest.mark.slow
@pytest.mark.parametrize("control", ["group", "tree"])
def test_hanging_site_times_out_and_leaves_no_process(tmp_path: Path, control: str) -> None:
    """Each attempt of a hanging site is stopped at the timeout; no process of it survives.
    The same with process groups and with tracked process trees."""
    config = write_config(
        tmp_path,
        ["hang-a", "ok-b"],
        retry_count=2,
        timeout=2,
        kill_grace_seconds=0.5,
        process_control=control,
    )
    started = time.monotonic()
    _, summary = run(config)
    assert time.monotonic() - started < 60
    entry = site(summary, "hang-a")
    assert entry["status"] == "timed_out" and entry["attempts"] == 2
    assert summary["counts"]["timed_out"] == 1
    assert site(summary, "ok-b")["status"] == "succeeded"
    pid_files = list(tmp_path.glob("*.pids"))
    assert len(pid_files) == 2  # one per attempt: the timeout was retried
    for pid_file in pid_files:
        for pid in map(int, pid_file.read_text().split()):
            assert not alive(pid), f"pid {pid} from {pid_file.name} is still alive"


@pytest.mark.parametrize(("cap", "count"), [(2, 6), pytest.param(3, 12, marks=pytest.mark.slow)])
def test_cap_is_never_exceeded(tmp_path: Path, cap: int, count: int) -> None:
    """`count` sites with cap `cap`: the pipelines' own timestamps never show more running."""
    sites = [f"ok-{i}" for i in range(count)]
    config = write_config(
        tmp_path,
        sites,
        max_concurrent_sites=cap,
        env={"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_SLEEP": "0.6"},
    )
    _, summary = run(config)
    assert summary["counts"]["succeeded"] == count
    rows = read_timeline(tmp_path)
    assert len(rows) == 2 * count
    assert max_overlap(rows) == cap  # capped, and really concurrent


@pytest.mark.slow
def test_a_prefect_tag_limit_on_the_same_tag_is_still_enforced(tmp_path: Path) -> None:
    """If someone creates Prefect's own tag limit `tag:<tag>` = 1, Prefect enforces it too."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    tag = f"taglimit-{tmp_path.name}"[:50]
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=f"tag:{tag}", limit=1)
        )
    config = write_config(
        tmp_path,
        ["ok-a", "ok-b", "ok-c"],
        max_concurrent_sites=3,
        concurrency_tag=tag,
        env={"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_SLEEP": "0.5"},
    )
    _, summary = run(config)
    assert summary["counts"]["succeeded"] == 3
    assert max_overlap(read_timeline(tmp_path)) == 1


def test_use_async_false_runs_one_site_at_a_time_in_order(tmp_path: Path) -> None:
    """use_async: false is the old sequential loop: no overlap, sites in list order."""
    sites = ["ok-d", "ok-a", "ok-c", "ok-b"]
    config = write_config(tmp_path, sites, use_async=False, max_concurrent_sites=4)
    _, summary = run(config)
    assert summary["counts"]["succeeded"] == 4
    rows = read_timeline(tmp_path)
    assert max_overlap(rows) == 1
    assert [who for who, what, _ in rows if what == "start"] == sites


@pytest.mark.slow
def test_retry_delay_does_not_hold_the_slot(tmp_path: Path) -> None:
    """Cap 1: while a flaky site waits 3 s before its retry, the other site runs in that slot."""
    config = write_config(
        tmp_path, ["flaky-a", "ok-b"], max_concurrent_sites=1, retry_count=2, retry_delay=3
    )
    _, summary = run(config)
    assert summary["counts"]["succeeded"] == 2
    rows = read_timeline(tmp_path)
    flaky_starts = starts(rows, "flaky-a")
    assert len(flaky_starts) == 2
    assert flaky_starts[0] < starts(rows, "ok-b")[0] < flaky_starts[1]
    assert max_overlap(rows) == 1


def test_summary_shape_result_line_and_ui_records(tmp_path: Path) -> None:
    """The summary has the documented shape; the UI has one task run per site, named after it,
    tagged, with the artifacts (the failures grouped by kind, progress at 100 %) and the
    stderr line in the failing site's logs."""
    config = write_config(tmp_path, ["ok-a.com", "fail-b"], retry_count=1)
    state, summary = run(config)
    assert set(summary) == {"flow_run_id", "state", "counts", "sites"}
    assert summary["state"] == "Failed"
    assert summary["counts"] == {
        "total": 2,
        "succeeded": 1,
        "failed": 1,
        "timed_out": 0,
        "cancelled": 0,
        "skipped": 0,
        "check_warnings": 0,
    }
    for entry in summary["sites"]:
        assert set(entry) == {
            "site",
            "status",
            "attempts",
            "exit_code",
            "duration_s",
            "error",
            "result",
            "check",
            "timeout_s",
            "cause",
            "logs",
            "peak_rss_mb",
            "cpu_s",
            "usage",
            "stopped_by",
        }
        assert entry["stopped_by"] is None  # it exited by itself, succeeded or not
        assert entry["timeout_s"] == 60  # no learned_timeout: pipeline.timeout
    result = site(summary, "ok-a.com")["result"]  # the JSON status line, parsed
    assert result["site"] == "ok-a.com" and result["env_site"] == "ok-a.com"
    assert result["output_dir"] == str(tmp_path / "output" / "ok-a.com")  # SITE_OUTPUT_DIR
    assert Path(result["output_dir"]).is_dir()
    assert result["cwd"] == str(tmp_path)  # working_dir "." is the config's folder
    assert result["env_attempt"] == "1"
    assert result["env_flow_run_id"] == summary["flow_run_id"]
    assert site(summary, "fail-b")["result"] is None
    assert as_bools(summary) == {"ok-a.com": True, "fail-b": False}  # the original view

    APILogWorker.drain_all(timeout=10)
    flow_run_id = UUID(summary["flow_run_id"])
    assert state.state_details.flow_run_id == flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        by_name = {run.name: run for run in task_runs}
        assert set(by_name) == {"ok-a.com", "fail-b"}
        assert by_name["ok-a.com"].state is not None and by_name["ok-a.com"].state.is_completed()
        assert by_name["fail-b"].state is not None and by_name["fail-b"].state.is_failed()
        assert all(f"test-{tmp_path.name}"[:60] in run.tags for run in task_runs)
        logs = client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[by_name["fail-b"].id]))
        )
        assert any("fail-b: boom on attempt 1" in log.message for log in logs)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        kinds = {artifact.key: artifact.type for artifact in artifacts}
        table = next(a for a in artifacts if a.key == "site-pipeline-summary")
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        by_site = {row["site"]: row for row in rows}
        assert by_site["fail-b"]["status"] == "failed" and by_site["fail-b"]["exit_code"] == 1
        assert by_site["fail-b"]["last_stderr"] == "fail-b: boom on attempt 1"
        assert by_site["ok-a.com"]["status"] == "succeeded" and by_site["fail-b"]["result"] == ""
        shown = by_site["ok-a.com"]["result"]  # the JSON status line, compact and cut
        assert shown.startswith('{"site":"ok-a.com","attempt":1,') and len(shown) <= 120
        assert kinds.get("site-pipeline-summary") == "table"
        assert kinds.get("site-pipeline-failures") == "markdown"
        assert kinds.get("site-pipeline-progress") == "progress"
        # What the UI shows: the failing site under its kind, and progress at 100 % at the end
        failures = next(a for a in artifacts if a.key == "site-pipeline-failures")
        assert failures.data == (
            "# Failed sites by cause\n\n## fail-b: boom on attempt 1 (1)\n\n"
            "- `fail-b` after 1 attempt(s): exit code 1: fail-b: boom on attempt 1\n"
        )
        progress = next(a for a in artifacts if a.key == "site-pipeline-progress")
        assert progress.data == 100.0
        limit = client.read_global_concurrency_limit_by_name(f"test-{tmp_path.name}"[:60])
        assert limit.limit == 5 and limit.active_slots == 0  # every slot given back


def test_progress_and_error_aggregation_off_make_no_such_artifacts(tmp_path: Path) -> None:
    """async_settings.progress_reporting and error_aggregation reach the flow: off, a run with
    a failure makes the summary table and the site health only (no progress bar, no failures
    by cause)."""
    config = write_config(
        tmp_path,
        ["ok-a", "fail-b"],
        async_settings={"progress_reporting": False, "error_aggregation": False},
    )
    _, summary = run(config)
    assert summary["counts"]["failed"] == 1
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(summary["flow_run_id"])])
            )
        )
    assert sorted(artifact.key for artifact in artifacts) == [
        "site-pipeline-health",
        "site-pipeline-summary",
    ]


def test_loud_site_logs_are_bounded_in_the_api(tmp_path: Path) -> None:
    """A site printing 20 MB ends fine and sends at most about 2 * max_log_lines log records."""
    config = write_config(tmp_path, ["loud-a"], max_log_lines=40)
    _, summary = run(config)
    assert site(summary, "loud-a")["status"] == "succeeded"
    assert site(summary, "loud-a")["result"]["site"] == "loud-a"
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        task_run = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(summary["flow_run_id"])]))
        )[0]
        logs = client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run.id])), limit=200
        )
    assert 80 <= len(logs) <= 2 * 40 + 10
    assert any("output lines not logged" in log.message for log in logs)


def test_sites_parameter_overrides_config_and_is_validated(tmp_path: Path) -> None:
    """The `sites` parameter replaces the config's list; a bad name fails the run; nothing ran."""
    config = write_config(tmp_path, ["ok-from-config"])
    _, summary = run(config, sites=["ok-param"])
    assert [entry["site"] for entry in summary["sites"]] == ["ok-param"]
    state = run_sites(config_path=str(config), sites=["-rf"], return_state=True)
    assert state.is_failed() and "must not start with '-'" in (state.message or "")
    assert starts(read_timeline(tmp_path), "ok-from-config") == []


@pytest.mark.slow  # waits out the API patience
def test_an_api_that_keeps_failing_fails_waiting_sites_after_api_patience(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the server stops giving slots (503s from the 3rd request on), the 2 sites still
    waiting fail after api_patience with 'could not get a concurrency slot from <url>: ...',
    grouped as "no slot"; the 2 running pipelines finish and are reported; the run fails."""
    from flows.slots import ApiUnavailable
    from flows.slots import prefect_api as prefect_slots

    original = prefect_slots.PrefectSlotApi.acquire
    granted: list[object] = []

    def acquire_then_fail(self: prefect_slots.PrefectSlotApi, name: str, seconds: float):  # type: ignore[no-untyped-def]
        if len(granted) >= 2:
            raise ApiUnavailable("HTTP 503 Service Unavailable")
        lease = original(self, name, seconds)
        if lease is not None:
            granted.append(lease)
        return lease

    monkeypatch.setattr(prefect_slots.PrefectSlotApi, "acquire", acquire_then_fail)
    config = write_config(
        tmp_path,
        ["ok-a", "ok-b", "ok-c", "ok-d"],
        max_concurrent_sites=2,
        api_patience=1,
        env={"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_SLEEP": "3"},
    )
    state, summary = run(config)
    assert [s["status"] for s in summary["sites"]] == ["succeeded", "succeeded", "failed", "failed"]
    for name in ("ok-c", "ok-d"):
        error = site(summary, name)["error"]
        assert error.startswith("could not get a concurrency slot from http://127.0.0.1:")
        assert error.endswith(": HTTP 503 Service Unavailable")
        assert site(summary, name)["attempts"] == 0
    assert {row[0] for row in read_timeline(tmp_path)} == {"ok-a", "ok-b"}
    assert state.is_failed()
    assert state.message == "2 of 4 sites failed: 2 \N{MULTIPLICATION SIGN} no slot (ok-c, ok-d)"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(summary["flow_run_id"])])
            )
        )
    failures = next(a for a in artifacts if a.key == "site-pipeline-failures")
    assert "## no slot (2)" in str(failures.data)


@pytest.mark.parametrize(("control", "leads_its_group"), [("group", True), ("tree", False)])
def test_process_control_reaches_the_runner(
    tmp_path: Path, control: str, leads_its_group: bool
) -> None:
    """process_control: group starts each pipeline as its own process group's leader; tree
    does not (it tracks the process tree instead, as on Windows)."""
    config = write_config(tmp_path, ["ok-a"], process_control=control)
    _, summary = run(config)
    result = site(summary, "ok-a")["result"]
    assert (result["pgid"] == result["pid"]) is leads_its_group


@pytest.mark.slow
def test_a_learned_timeout_stops_a_hanging_site_at_its_usual_pace(tmp_path: Path) -> None:
    """Five real 1-second successes of a site, then it hangs: the attempt is killed at the
    learned 2 x p95 (about 2 s), not at the 60 s timeout, and reported timed out; a site
    with no history keeps the 60 s. Each summary row gives its timeout_s."""
    known, fresh = f"ok-learn-{tmp_path.name}"[:60], f"ok-fresh-{tmp_path.name}"[:60]
    learned = {"factor": 2.0, "min_runs": 5, "window": 20, "floor": 1}
    env = {"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_PIDS_DIR": str(tmp_path)}
    seed = write_config(tmp_path, [known], env={**env, "FAKE_SLEEP": "1"}, learned_timeout=learned)
    for _ in range(5):
        run(seed)
    config = write_config(
        tmp_path, [known, fresh], env={**env, "FAKE_HANG": known}, learned_timeout=learned
    )
    started = time.monotonic()
    _, summary = run(config)
    hung, other = site(summary, known), site(summary, fresh)
    assert hung["status"] == "timed_out"
    assert 2.0 <= hung["timeout_s"] <= 4.0, hung  # 2 x p95 of ~1.05-1.5 s runs
    assert hung["error"].startswith(f"timed out after {hung['timeout_s']:g} s")
    assert (hung["stopped_by"], other["stopped_by"]) == ("timeout", None)
    assert time.monotonic() - started < 30
    assert other["status"] == "succeeded" and other["timeout_s"] == 60
