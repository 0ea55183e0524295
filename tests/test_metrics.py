"""Metrics (`pipeline.metrics`, `flows.metrics`) at the cheapest level: the config's
checks, what a run's snapshot holds, which sites keep their values, the file's format
(against `prometheus_client`'s), the atomic write, and the warning when an output fails.
The real Prometheus, node exporter and Pushgateway: tests/e2e/test_metrics.py."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flows import metrics, metrics_families, metrics_values
from flows.config import ConfigError, load_plan, parse_config
from flows.metrics import Outputs
from flows.metrics_values import SiteValues
from tests.conftest import cli_in_process, write_config

END = 1_800_000_000.0


def row(site: str, status: str = "succeeded", **more: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "site": site,
        "status": status,
        "attempts": 1,
        "duration_s": 1.5,
        "peak_rss_mb": 10.0,
        "cpu_s": 0.25,
        "check": None,
    }
    return {**base, **more}


def values(**more: Any) -> SiteValues:
    base: dict[str, Any] = {
        "group": "",
        "last_run": END - 86400,
        "first_run": END - 10 * 86400,
        "status": "succeeded",
        "duration": 9.0,
        "attempts": 1,
        "streak": 0,
        "last_success": END - 86400,
    }
    return SiteValues(**{**base, **more})


# --- the config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("metrics: {}", "pipeline.metrics.textfile: expected textfile, pushgateway or both"),
        ("metrics: {textfile: out.txt}", "pipeline.metrics.textfile = 'out.txt': expected a file"),
        (
            "metrics: {pushgateway: {url: 'localhost:9091'}}",
            "pipeline.metrics.pushgateway.url = 'localhost:9091': expected an http:// or https://",
        ),
        (
            "metrics: {pushgateway: {url: 'ftp://h/x'}}",
            "pipeline.metrics.pushgateway.url = 'ftp://h/x': expected an http://",
        ),
        (
            "metrics: {pushgateway: {url: 'http://h:99999'}}",
            "pipeline.metrics.pushgateway.url = 'http://h:99999': expected an http://",
        ),
        (
            "metrics: {pushgateway: {url: 'http://h:9091', grouping: {job: x}}}",
            "pipeline.metrics.pushgateway.grouping.'job': expected a label name",
        ),
        (
            "metrics: {pushgateway: {url: 'http://h:9091', grouping: {a-b: x}}}",
            "pipeline.metrics.pushgateway.grouping.'a-b': expected a label name",
        ),
        (
            "metrics: {pushgateway: {url: 'http://h:9091', grouping: {host: ''}}}",
            "pipeline.metrics.pushgateway.grouping.host = '': expected a value",
        ),
        (
            "metrics: {pushgateway: {url: 'http://h:9091', timeout: 0}}",
            "pipeline.metrics.pushgateway.timeout = 0",
        ),
        ("metrics: {textfile: a.prom, folder: x}", "pipeline.metrics.folder: unknown key"),
    ],
)
def test_bad_metrics_config_names_the_key(body: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"pipeline:\n  {body}\n")
    assert expected in str(caught.value)


def test_metrics_are_off_by_default_and_both_outputs_read() -> None:
    assert parse_config("pipeline: {}\n").metrics is None
    config = parse_config(
        "pipeline:\n  metrics:\n    textfile: collector/site_pipeline.prom\n"
        "    pushgateway: {url: 'https://push.example:9091/base', grouping: {host: a}}\n"
    ).metrics
    assert config is not None and config.textfile == "collector/site_pipeline.prom"
    assert config.pushgateway is not None and config.pushgateway.job == "site-pipeline"
    assert config.pushgateway.grouping == {"host": "a"}


def test_a_textfile_folder_that_does_not_exist_is_exit_2_and_nothing_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, ["ok-a"], metrics={"textfile": "nope/site_pipeline.prom"})
    with pytest.raises(ConfigError) as caught:
        load_plan(config)
    assert "pipeline.metrics.textfile = 'nope/site_pipeline.prom': expected a file in an " in (
        str(caught.value)
    )
    code, _, err = cli_in_process(["run", "--config", str(config)], capsys)
    assert code == 2 and "pipeline.metrics.textfile" in err
    assert not (tmp_path / "timeline.tsv").exists()  # nothing ran
    (tmp_path / "folder.prom").mkdir()
    write_config(tmp_path, ["ok-a"], metrics={"textfile": "folder.prom"})
    with pytest.raises(ConfigError, match="expected a file, not a folder"):
        load_plan(config)
    write_config(tmp_path, ["ok-a"], metrics={"textfile": "site_pipeline.prom"})
    assert load_plan(config).config.metrics is not None


# --- what a run exports --------------------------------------------------------------------


def test_a_run_s_sites_take_its_values() -> None:
    summary = {
        "sites": [
            row(
                "ok.example",
                attempts=2,
                duration_s=12.345,
                peak_rss_mb=412.3,
                cpu_s=8.51,
                check={"field": "records", "value": 7, "ok": True, "reason": None},
            ),
            row("bad.example", "failed", peak_rss_mb=None, cpu_s=None),
            row("slow.example", "timed_out", attempts=3),
        ]
    }
    snap = metrics_values.build(summary, {}, ended=END, duration=60.0, groups={"ok.example": "g"})
    ok, bad, slow = (snap.sites[s] for s in ("ok.example", "bad.example", "slow.example"))
    assert ok == SiteValues(
        group="g",
        last_run=END,
        first_run=END,
        status="succeeded",
        duration=12.345,
        attempts=2,
        streak=0,
        last_success=END,
        peak_rss_bytes=round(412.3 * 2**20),
        cpu=8.51,
        check=("records", 7.0),
    )
    assert (bad.status, bad.streak, bad.last_success, bad.peak_rss_bytes, bad.cpu) == (
        "failed",
        1,
        None,
        None,
        None,
    )
    assert (slow.status, slow.attempts, slow.streak) == ("timed_out", 3, 1)
    assert snap.run.sites == {
        "succeeded": 1,
        "failed": 1,
        "timed_out": 1,
        "cancelled": 0,
        "skipped": 0,
    }
    assert (snap.run.end, snap.run.duration) == (END, 60.0)


def test_a_check_value_that_is_not_a_number_is_not_exported() -> None:
    for value in (None, "7", True, float("nan")):
        check = {"field": "records", "value": value, "ok": False, "reason": "x"}
        snap = metrics_values.build({"sites": [row("a", check=check)]}, {}, ended=END)
        assert snap.sites["a"].check is None


def test_sites_not_in_this_run_keep_their_values() -> None:
    """A --site subset, a --retry-failed run (skipped sites) and a stop or halt before a
    site's first attempt leave those sites' values as they were."""
    before = {
        "other.example": values(status="failed", streak=2, last_success=None),
        "skipped.example": values(),
        "unstarted.example": values(status="timed_out", streak=4),
        "ran.example": values(status="failed", streak=2),
    }
    summary = {
        "sites": [
            row("skipped.example", "skipped", attempts=0),
            row("unstarted.example", "cancelled", attempts=0),
            row("ran.example", "failed"),
        ]
    }
    snap = metrics_values.build(summary, before, ended=END, configured=None)
    for site in ("other.example", "skipped.example", "unstarted.example"):
        assert snap.sites[site] == before[site], site
    ran = snap.sites["ran.example"]
    assert (ran.streak, ran.last_run, ran.last_success) == (3, END, END - 86400)
    assert ran.first_run == before["ran.example"].first_run
    assert snap.run.sites["skipped"] == 1 and snap.run.sites["cancelled"] == 1


def test_a_site_removed_from_the_config_is_dropped_and_kept_when_the_list_is_unknown() -> None:
    before = {"kept.example": values(), "removed.example": values()}
    summary = {"sites": [row("new.example")]}
    listed = metrics_values.build(
        summary, before, ended=END, configured={"kept.example", "new.example"}
    )
    assert set(listed.sites) == {"new.example", "kept.example"}
    unknown = metrics_values.build(summary, before, ended=END, configured=None)
    assert set(unknown.sites) == {"new.example", "kept.example", "removed.example"}


def test_the_failure_streak_follows_the_health_rule_and_the_history() -> None:
    before = {"a": values(streak=2), "b": values(streak=2), "c": values(streak=2)}
    summary = {
        "sites": [row("a", "failed"), row("b", "succeeded"), row("c", "cancelled", attempts=1)]
    }
    snap = metrics_values.build(summary, before, ended=END)
    assert [snap.sites[s].streak for s in "abc"] == [3, 0, 2]
    # the run history knows more (metrics turned on later): the larger count is kept
    snap = metrics_values.build(summary, before, ended=END, streaks={"a": 6, "b": 0})
    assert [snap.sites[s].streak for s in "abc"] == [6, 0, 2]


# --- the file --------------------------------------------------------------------------------

ODD_SITES = ["plain.example", 'quote"site', "back\\slash", "ünï.example/path?x=1", "a,b={c}"]


def odd_snapshot() -> metrics_values.Snapshot:
    rows = [
        row(site, status, check={"field": "stats.records", "value": 3.25, "ok": True}, cpu_s=1.0)
        for site, status in zip(
            ODD_SITES, ["succeeded", "failed", "timed_out", "cancelled", "succeeded"], strict=True
        )
    ]
    groups = {'quote"site': "vendor-host"}
    return metrics_values.build(
        {"sites": rows}, {}, ended=END + 0.123456, duration=42.5, groups=groups
    )


def samples(text: str) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_file_says_what_prometheus_client_says_and_reads_back() -> None:
    snap = odd_snapshot()
    text = metrics_families.render(snap)
    ours = samples(text)
    assert ours == samples(generate_latest(metrics_families.registry(snap)).decode())
    assert len(ours) > 5 * len(ODD_SITES)
    assert metrics_families.read(text) == dict(snap.sites)
    names = {name for name, _, _ in ours}
    assert all(name.startswith("site_pipeline_") for name in names)
    labels = {key for _, pairs, _ in ours for key, _ in pairs}
    assert labels == {"site", "group", "status", "field"}  # bounded: no cause, no run id


def test_a_file_that_is_not_ours_is_an_error_and_the_export_warns(tmp_path: Path) -> None:
    state = tmp_path / "site_pipeline.prom"
    state.write_text('site_pipeline_site_last_attempts{site="a",group=""} 1\n', encoding="utf-8")
    with pytest.raises(ValueError, match="site 'a'"):
        metrics_families.read_file(state)
    warnings = metrics.export(Outputs(state, textfile=state), {"sites": [row("b")]}, ended=END)
    assert len(warnings) == 1 and "could not read the previous metrics" in warnings[0]
    assert set(metrics_families.read_file(state)) == {"b"}


def test_the_write_replaces_atomically_and_retries_a_held_file(tmp_path: Path) -> None:
    target = tmp_path / "site_pipeline.prom"
    target.write_text("old\n", encoding="utf-8")
    calls: list[tuple[Path, Path]] = []

    def held_twice(source: Path, destination: Path) -> None:
        calls.append((source, destination))
        assert source.read_text(encoding="utf-8") == "new\n"  # complete before the replace
        assert not source.name.endswith(".prom")  # a collector never reads it
        if len(calls) < 3:
            raise PermissionError(13, "held by the exporter")
        Path(source).replace(destination)

    metrics.write_atomically(target, "new\n", replace_file=held_twice)
    assert len(calls) == 3 and target.read_text(encoding="utf-8") == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site_pipeline.prom"]

    def held(source: Path, destination: Path) -> None:
        raise PermissionError(13, "held by the exporter")

    with pytest.raises(PermissionError):
        metrics.write_atomically(target, "newer\n", retry_for=0.1, replace_file=held)
    assert target.read_text(encoding="utf-8") == "new\n"  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site_pipeline.prom"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_failing_output_is_one_warning_line_and_the_other_still_goes(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    state = tmp_path / "site_pipeline.prom"
    warnings = metrics.export(
        Outputs(state, textfile=state, push_url=url, timeout=2),
        {"sites": [row("a")]},
        ended=END,
    )
    assert len(warnings) == 1
    assert warnings[0].startswith(f"metrics: could not push to the Pushgateway {url}: ")
    assert "\n" not in warnings[0]
    assert set(metrics_families.read_file(state)) == {"a"}  # the file was written all the same

    gone = tmp_path / "gone" / "site_pipeline.prom"  # its folder removed after the check
    warnings = metrics.export(Outputs(gone, textfile=gone), {"sites": [row("a")]}, ended=END)
    assert len(warnings) == 1
    assert warnings[0] == (
        f"metrics: could not write the textfile {gone}: No such file or directory"
    )


def test_the_state_without_a_textfile_keeps_values_across_runs(tmp_path: Path) -> None:
    """Pushgateway only: the previous values come from <output_dir>/metrics.prom."""
    state = tmp_path / "output" / metrics.STATE_NAME
    first = {"sites": [row("a", "failed"), row("b")]}
    assert metrics.export(Outputs(state), first, ended=END) == []
    second = {"sites": [row("a", "failed")]}
    assert metrics.export(Outputs(state), second, ended=END + 86400) == []
    kept = metrics_families.read_file(state)
    assert kept["a"].streak == 2 and kept["a"].first_run == END
    assert kept["b"].last_run == END  # not in the second run: as it was


def test_the_metrics_module_is_plain_python() -> None:
    """flows.metrics imports neither Prefect nor Dask (tests/project/test_boundaries.py's check)."""
    from tests.support.imports import loaded_heavy

    assert loaded_heavy("flows.metrics") == []


def test_the_metrics_bench_runs() -> None:
    """bench/metrics_write.py still runs (its numbers live in BENCHMARKS.md)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run(
        [sys.executable, "bench/metrics_write.py", "--sites", "50", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "| **export: read + build + write (target <= 100 ms)** |" in done.stdout


@pytest.mark.windows
@pytest.mark.skipif(sys.platform != "win32", reason="needs Windows: its open files stay")
def test_a_file_the_exporter_holds_open_is_replaced_once_it_lets_go(tmp_path: Path) -> None:
    """On Windows a file another handle holds open can't be replaced (WinError 5): the write
    waits for it. (Checked under Wine's Windows CPython 3.11 on 2026-12-07: the plain replace
    refused, the write done 0.51 s in, once the reader closed it at 0.5 s.)"""
    target = tmp_path / "site_pipeline.prom"
    target.write_text("old\n", encoding="utf-8")
    held = open(target, encoding="utf-8")  # the exporter reading it; closed by the timer
    other = tmp_path / "other.tmp"
    other.write_text("x", encoding="utf-8")
    with pytest.raises(PermissionError):
        os.replace(other, target)
    threading.Timer(0.5, held.close).start()
    started = time.monotonic()
    metrics.write_atomically(target, "new\n")
    assert time.monotonic() - started >= 0.4
    assert target.read_text(encoding="utf-8") == "new\n"


def test_a_pushgateway_that_answers_no_http_is_one_warning_line(tmp_path: Path) -> None:
    """Something else on the port (not HTTP): http.client's error, one line, the file
    written all the same."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer_garbage() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"-ERR unknown command\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    state = tmp_path / "site_pipeline.prom"
    try:
        warnings = metrics.export(
            Outputs(state, textfile=state, push_url=url, timeout=5),
            {"sites": [row("a")]},
            ended=END,
        )
    finally:
        server.close()
    assert len(warnings) == 1 and warnings[0].startswith(
        f"metrics: could not push to the Pushgateway {url}: BadStatusLine: "
    ), warnings
    assert set(metrics_families.read_file(state)) == {"a"}


def test_two_runs_ending_at_once_add_their_sites_not_over_each_other(tmp_path: Path) -> None:
    """The export holds the state's lock: a run that ends while another exports waits, then
    reads what that one wrote; one that waits too long says so in one line."""
    from filelock import FileLock

    from tests.support.waiting import wait_for, wait_until

    state = tmp_path / "site_pipeline.prom"
    outputs = Outputs(state, textfile=state)
    assert metrics.export(outputs, {"sites": [row("night")]}, ended=END) == []
    other_run = FileLock(str(tmp_path / ".site_pipeline.prom.lock"))
    other_run.acquire()
    results: list[list[str]] = []
    ending = threading.Thread(
        target=lambda: results.append(
            metrics.export(Outputs(state, textfile=state), {"sites": [row("manual")]}, ended=END)
        )
    )
    ending.start()
    try:
        assert not wait_for(lambda: "manual" in state.read_text(encoding="utf-8"), timeout=0.5)
    finally:
        other_run.release()
    wait_until(lambda: results, "the export once the lock is free", timeout=30)
    assert results == [[]] and set(metrics_families.read_file(state)) == {"night", "manual"}

    with FileLock(str(tmp_path / ".site_pipeline.prom.lock")):
        warnings = metrics.export(
            Outputs(state, textfile=state), {"sites": [row("late")]}, ended=END, lock_wait=0.1
        )
    assert len(warnings) == 1 and warnings[0].startswith("metrics: not exported: another run ")
    assert "late" not in metrics_families.read_file(state)
