"""The scaled server's backends going down mid-run: Redis (the lease storage, the messaging
broker, the docket) stopped for good, and PostgreSQL cut for 10 s through a TCP proxy. The
machine's PostgreSQL is never stopped: other tests use it."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.support.scaled import (
    TcpProxy,
    private_redis,
    redis_or_skip,
    scaled_server,
    start_cli_run,
    tee,
)
from tests.support.servers import (
    PG_PORT,
    postgres_or_skip,
    prefect_env,
    stop_process_group,
)
from tests.support.timeline import read_timeline

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CAP = 2


def _start_run(
    folder: Path, sites: list[str], url: str, api_patience: float, sleep: float = 4
) -> subprocess.Popen[str]:
    config = write_config(
        folder,
        sites,
        max_concurrent_sites=CAP,
        concurrency_tag="outage-cap",
        api_patience=api_patience,
        env={"FAKE_TIMELINE": str(folder / "timeline.tsv"), "FAKE_SLEEP": str(sleep)},
    )
    return start_cli_run(config, folder / "summary.json", prefect_env(folder / "client-home", url))


def _wait_for_starts(folder: Path, proc: subprocess.Popen[str], count: int) -> None:
    deadline = time.monotonic() + 90
    while sum(row[1] == "start" for row in read_timeline(folder / "timeline.tsv")) < count:
        assert proc.poll() is None, "the run ended early"
        assert time.monotonic() < deadline, f"{count} sites never started"
        time.sleep(0.1)


def test_redis_down_mid_run_fails_waiting_sites_within_api_patience(tmp_path: Path) -> None:
    """Redis stops for good while 2 of 6 pipelines (16 s each) run, api_patience 5 s: the
    running pipelines finish and hand their slots on (no API call) while the leases are
    fresh. The keeper's next renewal (every 20 s) fails, and so does every later call that
    reaches the lease storage; Prefect 3.9 meanwhile counts a slot it could not lease, so
    the limit looks full (423). The pool tells that from a full limit (its lease-storage
    probe fails), and api_patience after the first failure the waiting sites give up with an
    error naming the server. No site runs twice. The flow run's end fails on the server too
    (its events go through Redis): one `error:` line naming the request, no traceback."""
    postgres_or_skip()
    redis_or_skip()
    sites = [f"ok-{i}" for i in range(6)]
    out = tmp_path / "run.out"
    with private_redis(tmp_path / "redis") as redis, scaled_server(tmp_path, redis.port) as server:
        proc = _start_run(tmp_path, sites, server.url, api_patience=5, sleep=16)
        try:
            copy = tee(proc.stdout, out)  # type: ignore[arg-type]
            _wait_for_starts(tmp_path, proc, CAP)
            redis.stop()
            down_at = time.monotonic()
            gave_up = f"could not get a concurrency slot from {server.url}"
            while gave_up not in out.read_text() and proc.poll() is None:
                assert time.monotonic() - down_at < 90, "no waiting site gave up"
                time.sleep(0.2)
            waited = time.monotonic() - down_at
            proc.wait(timeout=120)
            copy.join(timeout=10)
        finally:
            stop_process_group(proc)  # type: ignore[arg-type]
    output = out.read_text()
    assert gave_up in output, output[-4000:]
    # The first failed renewal (<= 20 s after the start), then api_patience (5 s), with a
    # margin for a loaded machine.
    assert 5 <= waited < 20 + 5 + 25, output[-4000:]
    rows = read_timeline(tmp_path / "timeline.tsv")
    started = [row[0] for row in rows if row[1] == "start"]
    ended = [row[0] for row in rows if row[1] == "end"]
    assert len(started) == len(set(started)), started  # none twice
    assert sorted(ended) == sorted(started), output[-4000:]  # the running ones finished
    assert sorted(started) == sites[:4]  # the 2 asking the server after Redis left did not run
    assert proc.returncode == 1, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    (error,) = [line for line in output.splitlines() if "site-pipeline: error:" in line]
    assert error.startswith("site-pipeline: error: the Prefect API failed: HTTP 5"), error
    assert f" {server.url}/" in error, error  # the request, so the server


def test_postgres_down_for_10s_mid_run_the_run_completes(tmp_path: Path) -> None:
    """PostgreSQL unreachable for 10 s (its proxy cut) while 2 of 6 pipelines run
    (api_patience 60 s): the running pipelines finish, once PostgreSQL is back the other
    sites run, none twice, and the run Completes."""
    postgres_or_skip()
    redis_or_skip()
    sites = [f"ok-{i}" for i in range(6)]
    proxy = TcpProxy(PG_PORT)
    proxy.restore()
    try:
        with scaled_server(tmp_path, database_port=proxy.port) as server:
            proc = _start_run(tmp_path, sites, server.url, api_patience=60)
            try:
                copy = tee(proc.stdout, tmp_path / "run.out")  # type: ignore[arg-type]
                _wait_for_starts(tmp_path, proc, CAP)
                proxy.cut()
                time.sleep(10)  # the outage itself, not a wait for something
                proxy.restore()
                proc.wait(timeout=120)
                copy.join(timeout=10)
            finally:
                stop_process_group(proc)  # type: ignore[arg-type]
    finally:
        proxy.cut()
    output = (tmp_path / "run.out").read_text()
    assert proc.returncode == 0, output[-4000:]
    rows = read_timeline(tmp_path / "timeline.tsv")
    assert sorted(row[0] for row in rows if row[1] == "start") == sites  # each once
    assert sorted(row[0] for row in rows if row[1] == "end") == sites
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [site["status"] for site in summary["sites"]] == ["succeeded"] * 6
