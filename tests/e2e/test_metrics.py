"""End to end with the real components (issue 47): Debian's node exporter (its textfile
collector reading `pipeline.metrics.textfile`), Pushgateway (`pipeline.metrics.pushgateway`)
and Prometheus (scraping both every second, with monitoring/alerts.yml loaded), all on
loopback ports. One night with succeeding, failing, retried and timed-out sites; then,
through Prometheus's HTTP API, every site's values, by both ways, equal the summary JSON's,
every Grafana panel's query returns data, and the rules load healthy. Skips where the tools
are missing; fails instead under REQUIRE_PROMETHEUS=1 (.ci/run)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, cli_env, run_cli, write_config
from tests.support.monitoring_tools import dashboard_queries, tool
from tests.support.processes import start_tied, stop_tied
from tests.support.servers import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

MB = 2**20
PUSH_JOB = "site-pipeline-e2e"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback http
        return json.load(response)


class Stack:
    """The node exporter, the Pushgateway and Prometheus, started on free loopback ports."""

    def __init__(self, folder: Path) -> None:
        self.collector = folder / "textfile-collector"
        self.collector.mkdir()
        self.node_port, self.push_port, self.prom_port = free_port(), free_port(), free_port()
        self.push_url = f"http://127.0.0.1:{self.push_port}"
        self.prom_url = f"http://127.0.0.1:{self.prom_port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ROOT / "monitoring" / "alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": "textfile",
                    "static_configs": [{"targets": [f"127.0.0.1:{self.node_port}"]}],
                },
                {
                    "job_name": "pushgateway",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{self.push_port}"]}],
                },
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        logs = folder / "logs"
        logs.mkdir()
        argvs = {
            "node_exporter": [
                tool("node_exporter"),
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={self.collector}",
                f"--web.listen-address=127.0.0.1:{self.node_port}",
            ],
            "pushgateway": [
                tool("pushgateway"),
                f"--web.listen-address=127.0.0.1:{self.push_port}",
                f"--persistence.file={folder / 'pushgateway.data'}",
            ],
            "prometheus": [
                tool("prometheus"),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.prom_port}",
            ],
        }
        self.procs: list[subprocess.Popen[Any]] = []
        for name, argv in argvs.items():
            with open(logs / f"{name}.log", "wb") as log:
                self.procs.append(
                    start_tied(argv, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
                )

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.prom_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        answer = get_json(url)
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def ready(self) -> bool:
        try:
            targets = get_json(f"{self.prom_url}/api/v1/targets")["data"]["activeTargets"]
        except OSError:
            return False
        return len(targets) == 2 and all(t["health"] == "up" for t in targets)

    def stop(self) -> None:
        for proc in self.procs:
            stop_tied(proc, grace=5)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    for name in ("prometheus", "node_exporter", "pushgateway"):
        tool(name)
    started = Stack(tmp_path)
    try:
        wait_until(started.ready, "Prometheus up, scraping the node exporter and the Pushgateway")
        yield started
    finally:
        started.stop()


def by_site(stack: Stack, job: str) -> dict[str, dict[str, Any]]:
    """Each site's exported values by one way (its scrape job), as Prometheus has them now."""
    sites: dict[str, dict[str, Any]] = {}
    for series in stack.query(f'{{__name__=~"site_pipeline_site_.+", job="{job}"}}'):
        labels, value = series["metric"], float(series["value"][1])
        name = labels["__name__"].removeprefix("site_pipeline_site_")
        entry = sites.setdefault(labels["site"], {"group": labels.get("group", "")})
        if name == "last_status":
            entry["status"] = (labels["status"], value)
        elif name == "last_check_value":
            entry["check"] = (labels["field"], value)
        else:
            entry[name] = value
    return sites


def run_values(stack: Stack, job: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for series in stack.query(f'{{__name__=~"site_pipeline_run_.+", job="{job}"}}'):
        labels, value = series["metric"], float(series["value"][1])
        name = labels["__name__"].removeprefix("site_pipeline_run_")
        if name == "sites":
            found.setdefault("sites", {})[labels["status"]] = int(value)
        else:
            found[name] = value
    return found


def expected(row: dict[str, Any], end: float, group: str) -> dict[str, Any]:
    """What the metrics must say of a site, from its summary row (the run's end: `end`)."""
    status = row["status"]
    values: dict[str, Any] = {
        "group": group,
        "status": (status, 1.0),
        "last_run_timestamp_seconds": end,
        "first_run_timestamp_seconds": end,
        "last_duration_seconds": row["duration_s"],
        "last_attempts": float(row["attempts"]),
        "failure_streak": 1.0 if status in ("failed", "timed_out") else 0.0,
    }
    if status == "succeeded":
        values["last_success_timestamp_seconds"] = end
    if row["peak_rss_mb"] is not None:
        values["last_peak_rss_bytes"] = float(round(row["peak_rss_mb"] * MB))
    if row["cpu_s"] is not None:
        values["last_cpu_seconds"] = row["cpu_s"]
    check = row.get("check")
    if check and isinstance(check.get("value"), int | float):
        values["check"] = (check["field"], float(check["value"]))
    return values


def test_a_night_s_values_through_the_textfile_collector_and_the_pushgateway(
    prefect_api: str, tmp_path: Path, stack: Stack
) -> None:
    tag = uuid.uuid4().hex[:8]  # the session's history is shared: these sites are new
    ok, fails, flaky, hangs = (f"{kind}-{tag}.example" for kind in ("ok", "fail", "flaky", "hang"))
    folder = tmp_path / "night"
    folder.mkdir()
    config = write_config(
        folder,
        [
            ok,
            fails,
            {"site": flaky, "group": "vendor"},
            {"site": hangs, "timeout": 2, "retry_count": 1},
        ],
        retry_count=2,
        groups={"vendor": {"max_concurrent": 1}},
        result_checks={"field": "records", "on_fail": "warn"},
        metrics={
            "textfile": str(stack.collector / "site_pipeline.prom"),
            "pushgateway": {"url": stack.push_url, "job": PUSH_JOB, "grouping": {"night": tag}},
        },
    )
    env_config = yaml.safe_load(config.read_text(encoding="utf-8"))
    env_config["pipeline"]["env"]["FAKE_RECORDS"] = "7"
    config.write_text(yaml.safe_dump(env_config), encoding="utf-8")
    summary_path = folder / "summary.json"

    began = time.time()
    done = run_cli(
        ["run", "--config", str(config), "--summary-json", str(summary_path)], cli_env(prefect_api)
    )
    finished = time.time()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "metrics:" not in done.stdout + done.stderr  # no warning: every output went
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    rows = {row["site"]: row for row in summary["sites"]}
    assert {site: (row["status"], row["attempts"]) for site, row in rows.items()} == {
        ok: ("succeeded", 1),
        fails: ("failed", 2),
        flaky: ("succeeded", 2),
        hangs: ("timed_out", 1),
    }

    for job in ("textfile", PUSH_JOB):
        wait_until(
            lambda job=job: stack.query(f'site_pipeline_run_end_timestamp_seconds{{job="{job}"}}'),
            f"Prometheus has the night's metrics by job {job}",
        )
        run = run_values(stack, job)
        end = run["end_timestamp_seconds"]
        assert began < end < finished
        assert 0 < run["duration_seconds"] < finished - began
        assert run["sites"] == {s: summary["counts"][s] for s in run["sites"]}
        assert set(run["sites"]) == {"succeeded", "failed", "timed_out", "cancelled", "skipped"}
        exported = by_site(stack, job)
        groups = {flaky: "vendor"}
        want = {site: expected(row, end, groups.get(site, "")) for site, row in rows.items()}
        assert exported == want, job

    for title, promql in dashboard_queries():
        assert stack.query(promql), f"the panel {title!r}: {promql} returned no data"
    rules = get_json(f"{stack.prom_url}/api/v1/rules")["data"]["groups"]
    loaded = [rule for group in rules for rule in group["rules"]]
    assert len(loaded) == 4 and all(rule["health"] == "ok" for rule in loaded), loaded
