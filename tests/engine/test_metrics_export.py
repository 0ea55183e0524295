"""The hook: `finish_run`, where every run ends (a stopped and a halted one too), exports the
metrics, and an output that fails changes nothing of the run but one warning line each.
`finish_run` runs in a small flow of its own on the session's real Prefect API (it publishes
the run's artifacts), given the sites' reports, so no pipeline has to run."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from prefect.client.schemas.objects import State

from flows import metrics, metrics_families, metrics_values, report
from flows.config import load_plan
from flows.engine.finish import finish_run
from flows.interrupts import StopRequest
from tests.conftest import write_config

SITES = ["ok-a", "bad-b", "later-c"]


def reports() -> list[report.SiteReport]:
    return [
        report.SiteReport("ok-a", "succeeded", 1, 0, 0.5),
        report.SiteReport("bad-b", "failed", 2, 1, 1.25, "exit code 1"),
        report.SiteReport("later-c", "cancelled", 0, None, 0.0, "not started: stopped"),
    ]


@flow(name="metrics-finish-test", persist_result=False)
def end_a_run(config: str, ending: str, logger_name: str) -> State[dict[str, Any]]:
    """finish_run as the flow calls it, with the reports of a run that ended `ending`."""
    stop = StopRequest()
    if ending == "stopped":
        stop.request("stopped by SIGTERM")
    halted = "halt: 1 failed" if ending == "halted" else None
    logger = logging.getLogger(logger_name)
    return finish_run(logger, load_plan(config), "run-id", reports(), stop, halted)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def earlier_values(path: Path) -> None:
    """A previous night in the file: later-c failed twice in a row then."""
    earlier = {"sites": [report.SiteReport("later-c", "failed", 1, 1, 3.0).to_json()]}
    before = metrics_values.build(earlier, {}, ended=1_700_000_000.0)
    before = metrics_values.build(earlier, before.sites, ended=1_700_086_400.0)
    path.write_text(metrics_families.render(before), encoding="utf-8")


@pytest.mark.parametrize("ending", ["stopped", "halted"])
def test_a_stopped_or_halted_run_exports_and_ends_as_it_would(
    prefect_api: str, tmp_path: Path, ending: str
) -> None:
    textfile = tmp_path / "site_pipeline.prom"
    plan = load_plan(write_config(tmp_path, SITES, metrics={"textfile": textfile.name}))
    earlier_values(textfile)
    state = end_a_run(str(plan.config_path), ending, "test-metrics", return_state=True)
    assert state.is_cancelled() if ending == "stopped" else state.is_failed()
    exported = metrics_families.read_file(textfile)
    assert (exported["ok-a"].status, exported["ok-a"].attempts) == ("succeeded", 1)
    assert (exported["bad-b"].status, exported["bad-b"].streak) == ("failed", 1)
    # not started: kept as the previous night left it
    kept = exported["later-c"]
    assert (kept.status, kept.streak, kept.last_run) == ("failed", 2, 1_700_086_400.0)
    text = textfile.read_text(encoding="utf-8")
    assert 'site_pipeline_run_sites{status="cancelled"} 1' in text
    assert "site_pipeline_run_duration_seconds " in text  # the flow run's start to its end


def test_a_site_no_longer_in_the_config_leaves_the_metrics(
    prefect_api: str, tmp_path: Path
) -> None:
    """The config's own sites, read with the config (`RunPlan.configured_sites`), reach the
    export: a site of an earlier night that the config no longer lists is dropped; a site
    the config lists that did not run this time keeps its earlier values."""
    textfile = tmp_path / "site_pipeline.prom"
    earlier = {
        "sites": [
            report.SiteReport(s, "failed", 1, 1, 3.0).to_json() for s in ("later-c", "gone-x")
        ]
    }
    before = metrics_values.build(earlier, {}, ended=1_700_000_000.0)
    textfile.write_text(metrics_families.render(before), encoding="utf-8")
    plan = load_plan(write_config(tmp_path, SITES, metrics={"textfile": textfile.name}))
    assert plan.configured_sites == frozenset(SITES)
    end_a_run(str(plan.config_path), "halted", "test-metrics", return_state=True)
    exported = metrics_families.read_file(textfile)
    assert "gone-x" not in exported
    assert exported["later-c"].status == "failed" and exported["ok-a"].status == "succeeded"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_outputs_that_fail_are_one_warning_each_and_change_nothing_of_the_run(
    prefect_api: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "plain").mkdir()
    plain = load_plan(write_config(tmp_path / "plain", SITES))
    url = f"http://127.0.0.1:{closed_port()}"
    unwritable = Path("/proc/site_pipeline.prom")  # a folder that exists, where no file can go
    failing = load_plan(
        write_config(
            tmp_path, SITES, metrics={"textfile": str(unwritable), "pushgateway": {"url": url}}
        )
    )
    with caplog.at_level(logging.WARNING, logger="test-metrics-failing"):
        failed = end_a_run(str(failing.config_path), "", "test-metrics-failing", return_state=True)
    without = end_a_run(str(plain.config_path), "", "test-metrics-off", return_state=True)
    assert (failed.type, failed.message) == (without.type, without.message)
    assert failed.is_failed()
    summaries = [state.result(raise_on_failure=False) for state in (failed, without)]
    for summary in summaries:
        summary.pop("flow_run_id")
    assert summaries[0] == summaries[1]  # the summary, whole
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("metrics:")]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"metrics: could not write the textfile {unwritable}: ")
    assert lines[1].startswith(f"metrics: could not push to the Pushgateway {url}: ")
    assert not (plain.output_dir / metrics.STATE_NAME).exists()  # metrics off: nothing


def test_a_bug_in_the_export_is_one_warning_line_not_a_crashed_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever the export raises, the run's end goes on: one warning line."""
    from flows.engine.metrics_export import export_metrics

    plan = load_plan(write_config(tmp_path, SITES, metrics={"textfile": "site_pipeline.prom"}))
    broken = {"sites": [{"site": "ok-a"}]}  # no status: build() can't read it
    logger = logging.getLogger("test-metrics-bug")
    with caplog.at_level(logging.WARNING, logger="test-metrics-bug"):
        export_metrics(logger, plan, broken, {})
    assert [r.getMessage() for r in caplog.records] == ["metrics: not exported: KeyError: 'status'"]
