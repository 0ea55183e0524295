"""Running unattended, end to end on a real `prefect server start`: `setup` makes the
notification block and automations (idempotently), a failing deployment run posts exactly one
message to a webhook on loopback, a successful one posts none, and a flow run whose process
and worker die (no heartbeats) is marked Crashed within the grace plus a margin, notifies, and
`--retry-failed` picks it up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from uuid import UUID

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import State

from tests.conftest import PYTHON, ROOT, write_config
from tests.support.processes import hanging_pids, run_tied, start_tied, untie, wait_until_gone
from tests.support.servers import (
    BIN,
    events_named,
    free_port,
    prefect_env,
    prefect_server,
    process_worker,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

HOOK_ENV = "SITE_PIPELINE_HOOK_URL"
BLOCK = "site-pipeline-webhook-site-pipeline-hook-url"
HEARTBEAT = "prefect.flow-run.heartbeat"


@contextmanager
def webhook_listener() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on loopback that keeps every request body; yields (url, bodies)."""
    bodies: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            bodies.append(self.rfile.read(length).decode("utf-8", "replace"))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook/secret-token", bodies
    finally:
        server.shutdown()


GRACE = 40  # `setup --heartbeat-grace`: more than Prefect's shortest heartbeat interval, 30 s


def sh(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return run_tied(args, cwd=ROOT, env=env, timeout=timeout)


def posts_about(bodies: list[str], run_name: str) -> list[str]:
    """The posts that name `run_name`, so far."""
    return [b for b in bodies if run_name in b]


def test_notifications_heartbeats_and_a_dead_run_resumed(tmp_path: Path) -> None:
    site_pipeline = str(BIN / "site-pipeline")
    port = free_port()
    ui = {"PREFECT_UI_URL": f"http://127.0.0.1:{port}"}  # so messages link to the run
    with (
        webhook_listener() as (hook_url, bodies),
        prefect_server(tmp_path / "server", port=port, settings=ui) as api,
    ):
        env = prefect_env(tmp_path / "client", api, PWD=str(ROOT))
        config = write_config(
            tmp_path,
            ["ok-a.com", "fail-b.com"],
            concurrency_tag="unattended",
            notify=[{"kind": "webhook", "url_env": HOOK_ENV, "on": ["failed", "crashed"]}],
        )
        setup = [site_pipeline, "setup", "--config", str(config), "--heartbeat-grace", str(GRACE)]

        # A missing URL variable: exit 2, one line naming it, and nothing was created.
        missing = sh(setup, env)
        assert missing.returncode == 2, missing.stdout + missing.stderr
        assert missing.stderr.strip().splitlines() == [
            f"site-pipeline: error: pipeline.notify[0].url_env = '{HOOK_ENV}': expected that "
            "environment variable to hold the URL"
        ]
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            with pytest.raises(ObjectNotFound):
                client.read_work_pool("site-pool")

        env[HOOK_ENV] = hook_url
        first = sh(setup, env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"created notification block '{BLOCK}' (webhook)" in first.stdout
        assert f"created automation 'site-pipeline: notify {BLOCK}'" in first.stdout
        assert "created automation 'site-pipeline: crash runs whose heartbeats stopped'" in (
            first.stdout
        )
        again = sh(setup, env)
        assert again.returncode == 0 and "created" not in again.stdout + again.stderr
        assert "updated" not in again.stdout and again.stdout.count("unchanged") == 5
        assert "secret-token" not in first.stdout + first.stderr + again.stdout + again.stderr
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            for name in (
                f"site-pipeline: notify {BLOCK}",
                "site-pipeline: crash runs whose heartbeats stopped",
            ):
                assert len(client.read_automations_by_name(name)) == 1

        deploy = sh([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr

        with process_worker(env, "site-pool", ROOT, tmp_path / "worker.log"):
            failing = sh([site_pipeline, "submit", "--param", f"config_path={config}"], env)
            assert failing.returncode == 1, failing.stdout + failing.stderr
            failed_name = failing.stdout.split()[2]
            succeeding = sh(
                [site_pipeline, "submit", "--site", "ok-a.com", "--param", f"config_path={config}"],
                env,
            )
            assert succeeding.returncode == 0, succeeding.stdout + succeeding.stderr
            ok_name = succeeding.stdout.split()[2]

        posts = wait_until(lambda: posts_about(bodies, failed_name), "the failed run's post")
        message = json.loads(posts[0])["text"]
        assert "Failed" in message
        assert "1 of 2 sites failed: 1 \N{MULTIPLICATION SIGN} fail-b.com: boom" in message
        assert f"http://127.0.0.1:{port}/runs/flow-run/" in message

        # The flow process and its worker die together (a machine gone): no one reports the
        # run, its heartbeats stop, and the automation marks it Crashed, which notifies.
        (tmp_path / "hang").mkdir()
        hang_config = write_config(tmp_path / "hang", ["hang-c.com"], concurrency_tag="unattended")
        worker_log = tmp_path / "worker2.log"
        with process_worker(env, "site-pool", ROOT, worker_log):
            started = sh(
                [
                    site_pipeline,
                    "submit",
                    "--site",
                    "hang-c.com",
                    "--no-watch",
                    "--param",
                    f"config_path={hang_config}",
                ],
                env,
            )
            assert started.returncode == 0, started.stdout + started.stderr
            since = datetime.now(UTC) - timedelta(minutes=5)
            run_id = UUID(started.stdout.split("(", 1)[1].split(")", 1)[0])
            pipeline, grandchild = hanging_pids(tmp_path / "hang")
            flow_process = psutil.Process(pipeline).parent()
            assert flow_process is not None
            worker = flow_process.parent()
            with (
                temporary_settings({PREFECT_API_URL: api}),
                get_client(sync_client=True) as client,
            ):
                wait_until(
                    lambda: [
                        e
                        for e in events_named(client, HEARTBEAT, since)
                        if e.resource.id == f"prefect.flow-run.{run_id}"
                    ],
                    "the run's first heartbeat",
                )
            for proc in (worker, flow_process):
                if proc is not None:
                    os.kill(proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()
        assert wait_until_gone([pipeline, grandchild], timeout=30) == []  # the reaper's work
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:

            def crashed() -> State | None:
                state = client.read_flow_run(run_id).state
                return state if state is not None and state.is_crashed() else None

            # GRACE s after the last heartbeat, plus the triggers service's 5 s and a margin
            left = GRACE + 30 - (time.monotonic() - killed_at)
            state = wait_until(crashed, f"the killed run Crashed {GRACE + 30} s after", left, 1)
            assert f"no heartbeat for {GRACE} s" in (state.message or "")
        crashed_name = started.stdout.split()[2]
        wait_until(lambda: posts_about(bodies, crashed_name), "the crashed run's post")
        # Each notification was posted once: the crash's took its time, a duplicate of the
        # first would have come by now; the completed run's never comes (not in `on`).
        assert len(posts_about(bodies, failed_name)) == 1, bodies
        assert len(posts_about(bodies, crashed_name)) == 1, bodies
        assert posts_about(bodies, ok_name) == []

        resumed = start_tied(
            [PYTHON, "-m", "flows", "run", "--retry-failed", "last"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert resumed.stdout is not None
        line = resumed.stdout.readline() + resumed.stdout.readline()
        resumed.send_signal(signal.SIGTERM)
        out, err = resumed.communicate(timeout=90)
        untie(resumed)
        assert f"resuming flow run {crashed_name} ({run_id}, Crashed)" in line + out, (
            line + out + err
        )
        assert "running again 1: hang-c.com (" in line + out
