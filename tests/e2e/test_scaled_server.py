"""Prefect's scaled server (PostgreSQL, Redis through prefect-redis, the API with
`--no-services` and the services apart): two runs share one cap across a restart of the API,
and `doctor` says where the server keeps concurrency leases."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.ops.checkup import doctor, lease_storage_line
from flows.slots import LEASE_SECONDS
from tests.conftest import write_config
from tests.support.scaled import (
    LEASE_STORAGE,
    ScaledServer,
    redis_or_skip,
    scaled_server,
    start_cli_run,
    tee,
)
from tests.support.servers import (
    postgres_or_skip,
    prefect_env,
    stop_process_group,
)
from tests.support.timeline import max_overlap, read_timeline

CAP = 3
TAG = "scaled-cap"
# Prefect's server logs these when a lease goes missing or runs out (prefect/server/services/
# repossessor.py); our pool logs the last two when the server forgot or expired a lease
# (flows/slots/lease_book.py, LeaseBook._lost).
LEASE_TROUBLE = (
    "should be revoked but was not found",
    "Revoking lease",
    "no longer knows slot lease",
    "expired on the server",
)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaledServer]:
    """One scaled server (fresh database, private Redis) for this module's slow tests."""
    postgres_or_skip()
    redis_or_skip()
    with scaled_server(tmp_path_factory.mktemp("scaled")) as server:
        yield server


def _start_run(folder: Path, sites: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    config = write_config(
        folder,
        sites,
        max_concurrent_sites=CAP,
        concurrency_tag=TAG,
        env={"FAKE_TIMELINE": str(folder.parent / "timeline.tsv"), "FAKE_SLEEP": "3"},
    )
    return start_cli_run(config, folder / "summary.json", env)


@pytest.mark.slow
@pytest.mark.postgres
def test_two_runs_share_the_cap_across_an_api_restart_on_the_scaled_server(
    scaled: ScaledServer, tmp_path: Path
) -> None:
    """Two concurrent `site-pipeline run`s of 6 sites each on one limit (cap 3), the API
    restarted while pipelines run: every site runs exactly once, never more than 3 at a
    time across both runs, both runs Completed, no slot left taken, and (when the API was
    back within a lease's life) neither the server (API and services) nor our pool logged
    a lost or expired lease: Redis keeps the leases across the restart."""
    env = prefect_env(tmp_path / "client-home", scaled.url)
    runs = {name: [f"ok-{name}-{i}" for i in range(6)] for name in ("a", "b")}
    procs = {}
    for name, sites in runs.items():
        (tmp_path / name).mkdir()
        procs[name] = _start_run(tmp_path / name, sites, env)
    try:
        copies = [tee(p.stdout, tmp_path / f"{n}.out") for n, p in procs.items()]  # type: ignore[arg-type]
        timeline = tmp_path / "timeline.tsv"
        deadline = time.monotonic() + 90
        while sum(row[1] == "start" for row in read_timeline(timeline)) < CAP:
            assert all(p.poll() is None for p in procs.values()), "a run ended early"
            assert time.monotonic() < deadline, "3 sites never started"
            time.sleep(0.1)
        scaled.stop_api()  # with 3 pipelines running
        stopped_at = time.monotonic()
        time.sleep(2)
        scaled.start_api()
        downtime = time.monotonic() - stopped_at
        for proc in procs.values():
            proc.wait(timeout=120)
        for thread in copies:
            thread.join(timeout=10)
    finally:
        for proc in procs.values():
            stop_process_group(proc)  # type: ignore[arg-type]
    outputs = {name: (tmp_path / f"{name}.out").read_text() for name in procs}
    for name, proc in procs.items():
        assert proc.returncode == 0, outputs[name][-4000:]

    rows = read_timeline(timeline)
    started = sorted(row[0] for row in rows if row[1] == "start")
    assert started == sorted(runs["a"] + runs["b"])  # every site once: none lost, none twice
    assert max_overlap(rows) <= CAP
    with temporary_settings({PREFECT_API_URL: scaled.url}), get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(TAG)
        for name in runs:
            summary = json.loads((tmp_path / name / "summary.json").read_text())
            assert summary["state"] == "Completed", summary
            flow_run = client.read_flow_run(summary["flow_run_id"])
            assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
    assert (limit.limit, limit.active_slots) == (CAP, 0)
    # A lease lives 60 s (renewed every 20 s): an API down longer than that (a loaded
    # machine starts it slowly) lets leases expire, which Prefect frees; only a restart
    # shorter than a lease duration must lose none.
    if downtime < LEASE_SECONDS - 20:
        logs = scaled.logs() + "".join(outputs.values())
        troubles = [trouble for trouble in LEASE_TROUBLE if trouble in logs]
        assert troubles == [], f"API down {downtime:.0f} s"


@pytest.mark.slow
@pytest.mark.postgres
def test_doctor_names_redis_lease_storage_on_the_scaled_server(scaled: ScaledServer) -> None:
    """On the scaled server, `doctor` reports `prefect_redis.lease_storage` as the API's
    lease storage, and that a restart of the API keeps the leases."""
    with temporary_settings({PREFECT_API_URL: scaled.url}):
        lines, _ = doctor(None)
    line = next(line for line in lines if line.startswith("lease storage:"))
    assert line.startswith(f"lease storage: {LEASE_STORAGE} (in Redis: a restart of the API keeps")


def test_doctor_names_memory_lease_storage_on_a_plain_server(prefect_api: str) -> None:
    """On a plain server (the test harness), `doctor` reports Prefect's default in-memory
    lease storage and that a restart forgets the leases."""
    lines, _ = doctor(None)
    assert lines[1] == (
        "lease storage: prefect.server.concurrency.lease_storage.memory (in the API "
        "process's memory: a restart forgets the leases (a run gives their slots back by "
        "name), and several API servers don't share them)"
    )


class _NoSettings(BaseHTTPRequestHandler):
    """An API that does not expose its settings, as Prefect Cloud: 404 for everything."""

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_doctor_cannot_tell_the_lease_storage_when_the_api_hides_its_settings() -> None:
    """An API whose `GET /admin/settings` answers 404: the lease storage line says it
    cannot tell, with the status and why."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoSettings)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    try:
        with SyncPrefectClient(api=url) as client:
            line = lease_storage_line(client)
    finally:
        server.shutdown()
    assert line == (
        "lease storage: cannot tell (GET /admin/settings answered HTTP 404 Not Found; "
        "Prefect Cloud and some proxies don't expose the server's settings)"
    )


def test_flow_runs_starting_together_each_create_or_find_the_limit(prefect_api: str) -> None:
    """Eight runs that start at the same moment on a limit that does not exist yet (as two
    `site-pipeline run`s on a fresh server did): each one's `ensure_limit` succeeds, one
    way or the other, and the limit ends at the cap; none fails with ObjectAlreadyExists."""
    from flows.slots.prefect_api import ensure_limit

    name = f"race-{time.time_ns()}"
    barrier = threading.Barrier(8)
    results: list[str] = []
    errors: list[BaseException] = []

    def start() -> None:
        with get_client(sync_client=True) as client:
            barrier.wait()
            try:
                results.append(ensure_limit(client, name, 3))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(results) == 8
    assert sum(line.startswith("created") for line in results) == 1, results
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).limit == 3


class _Broken(BaseHTTPRequestHandler):
    """An API whose database is down: 500 for everything."""

    def do_PATCH(self) -> None:
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PATCH

    def log_message(self, *args: object) -> None:
        pass


def test_a_failing_progress_artifact_update_warns_and_the_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The API answers 500 to the progress artifact's update (PostgreSQL down for a while):
    the site still counts as done, a warning says the update failed, nothing is raised."""
    import logging
    import uuid

    from flows import report
    from flows.engine.progress import ProgressReporter

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    logger = logging.getLogger("test-progress")
    progress = ProgressReporter(1, logger, None, uuid.uuid4())
    done = report.SiteReport("ok-a", "succeeded", 1, 0, 0.1, None)
    try:
        with temporary_settings({PREFECT_API_URL: url}), caplog.at_level(logging.WARNING):
            assert progress.site_done(done) is done
    finally:
        server.shutdown()
    assert progress.done == 1
    assert any("could not update the progress artifact" in r.message for r in caplog.records)


@pytest.mark.filterwarnings("ignore:Artifact creation outside:FutureWarning")  # no flow run here
def test_artifacts_the_api_refuses_are_warnings_and_the_run_still_ends(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The API answers 500 to every artifact (Redis down: artifacts send events): the summary
    table, the site health and the failures each get one warning naming the key, the status
    and the request, nothing is raised, and the streaks still come back."""
    import logging

    from flows import report
    from flows.config import load_plan
    from flows.engine.finish import publish_artifacts
    from flows.names import FAILURES_KEY, HEALTH_KEY, SUMMARY_KEY

    plan = load_plan(write_config(tmp_path, ["ok-a", "bad-b"]))
    reports = [
        report.SiteReport("ok-a", "succeeded", 1, 0, 0.1, None),
        report.SiteReport("bad-b", "failed", 1, 1, 0.1, "exit code 1"),
    ]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    logger = logging.getLogger("test-artifacts")
    try:
        with temporary_settings({PREFECT_API_URL: url}), caplog.at_level(logging.WARNING):
            streaks = publish_artifacts(logger, plan, reports)
    finally:
        server.shutdown()
    assert streaks == {"ok-a": 0, "bad-b": 1}
    warnings = [r.getMessage() for r in caplog.records if r.name == "test-artifacts"]
    # The request is the artifact's POST, or the CSRF token's GET the client sends first.
    keys = (SUMMARY_KEY, HEALTH_KEY, FAILURES_KEY)
    assert len(warnings) == len(keys), warnings
    for key, warning in zip(keys, warnings, strict=True):
        prefix = f"could not publish the {key} artifact: HTTP 500 Internal Server Error for "
        assert warning.startswith(prefix) and f" {url}/" in warning, warning
