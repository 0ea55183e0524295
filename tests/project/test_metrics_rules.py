"""monitoring/: the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`: each alert firing and not firing), the unit tests go red when a rule
changes, the example Prometheus config is valid, and the Grafana dashboard's panels each
query site-pipeline's metrics (tests/e2e/test_metrics.py runs those queries for real)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support.monitoring_tools import dashboard_queries, missing, tool

MONITORING = ROOT / "monitoring"
ALERTS = (
    "SitePipelineSiteFailing",
    "SitePipelineSiteNoSuccess",
    "SitePipelineNightLong",
    "SitePipelineMetricsStale",
)


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rules found" in checked.stdout
    tested = promtool("test", "rules", "tests/alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = (MONITORING / "tests" / "alerts_test.yml").read_text(encoding="utf-8")
    rules = (MONITORING / "alerts.yml").read_text(encoding="utf-8")
    assert re.findall(r"- alert: (\w+)", rules) == list(ALERTS)
    for alert in ALERTS:
        blocks = re.findall(
            rf"alertname: {alert}\n\s+exp_alerts:(.*?)(?=\n\s+- eval_time|\n\n|\Z)", tests, re.S
        )
        assert any(b.strip() == "[]" for b in blocks), f"{alert}: no test that it stays quiet"
        assert any("exp_labels" in b for b in blocks), f"{alert}: no test that it fires"


@pytest.mark.parametrize(
    ("rule", "broken"),
    [
        ("site_pipeline_site_failure_streak >= 3", "site_pipeline_site_failure_streak >= 4"),
        ("> 36 * 3600", "> 38 * 3600"),
        ("or site_pipeline_site_first_run_timestamp_seconds", ""),
        ("> 1.5 * quantile_over_time", "> 2.5 * quantile_over_time"),
        ("> 26 * 3600", "> 28 * 3600"),
        ("or absent_over_time(site_pipeline_run_end_timestamp_seconds[26h])", ""),
    ],
)
def test_the_unit_tests_go_red_when_a_rule_changes(tmp_path: Path, rule: str, broken: str) -> None:
    rules = (MONITORING / "alerts.yml").read_text(encoding="utf-8")
    assert rule in rules
    (tmp_path / "tests").mkdir()
    (tmp_path / "alerts.yml").write_text(rules.replace(rule, broken), encoding="utf-8")
    shutil.copy(MONITORING / "tests" / "alerts_test.yml", tmp_path / "tests")
    tested = promtool("test", "rules", "tests/alerts_test.yml", cwd=tmp_path)
    assert tested.returncode != 0 and "FAILED" in tested.stdout + tested.stderr


def test_the_example_prometheus_config_is_valid() -> None:
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_has_the_issue_s_panels_on_our_metrics() -> None:
    queries = dashboard_queries()
    titles = {title for title, _ in queries}
    for wanted in ("Site status", "Failures by site", "Site durations over time", "Night length"):
        assert any(title.startswith(wanted) for title in titles), wanted
    for title, expr in queries:
        assert "site_pipeline_" in expr and "$" not in expr, (title, expr)


def test_the_dashboard_is_one_grafana_can_provision() -> None:
    """What Grafana's provisioning needs: a uid and title, panels with unique ids and a
    place each, every query on the `datasource` variable (picked at import)."""
    board = json.loads((MONITORING / "grafana" / "site-pipeline.json").read_text("utf-8"))
    assert board["uid"] == "site-pipeline" and board["title"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v["type"] for v in board["templating"]["list"]}
    assert variables == {"datasource": "datasource"}
    for panel in board["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_missing_tools_skip_and_fail_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "promtool not found on PATH" in (missing("promtool") or "")
    monkeypatch.delenv("REQUIRE_PROMETHEUS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="promtool not found"):
        tool("promtool")
    monkeypatch.setenv("REQUIRE_PROMETHEUS", "1")
    with pytest.raises(pytest.fail.Exception, match="REQUIRE_PROMETHEUS=1 but promtool"):
        tool("promtool")


def test_required_here_means_present() -> None:
    """Under REQUIRE_PROMETHEUS=1 (CI) every tool is on PATH."""
    if os.environ.get("REQUIRE_PROMETHEUS") != "1":
        pytest.skip("REQUIRE_PROMETHEUS is not 1")
    assert [
        name for name in ("promtool", "prometheus", "node_exporter", "pushgateway") if missing(name)
    ] == []
