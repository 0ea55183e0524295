"""The cap on real Prefect servers as teams run them: CSRF protection, basic auth,
PostgreSQL, a server that restarts mid-run, and clear CLI errors for API problems."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import PYTHON, ROOT, read_timeline, run_cli, write_config
from tests.support.servers import (
    free_port,
    postgres_database,
    postgres_or_skip,
    prefect_env,
    prefect_server,
    stop_process_group,
    tie_to_this_process,
)
from tests.support.timeline import max_overlap

pytestmark = pytest.mark.e2e

AUTH = "admin:s3cret-pass"
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "csrf": {"PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true"},
    "auth": {"PREFECT_SERVER_API_AUTH_STRING": AUTH},
}


@contextmanager
def server_for(kind: str, home: Path) -> Iterator[str]:
    if kind == "postgres":
        postgres_or_skip()
        with postgres_database() as database_url, prefect_server(home, database_url) as url:
            yield url
        return
    with prefect_server(home, settings=SETTINGS[kind]) as url:
        yield url


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server that wants basic auth, shared by this module's auth tests."""
    with server_for("auth", tmp_path_factory.mktemp("auth-server")) as url:
        yield url


@pytest.mark.parametrize(
    "kind", ["default", "csrf", "auth", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_four_sites_at_cap_2_run_on_every_server_setting(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On the default server, with CSRF protection, with basic auth and on PostgreSQL:
    4 sites at cap 2 all succeed, and never more than 2 pipelines overlap."""
    client_settings = {"PREFECT_API_AUTH_STRING": AUTH} if kind == "auth" else {}
    config = write_config(
        tmp_path,
        [f"ok-{i}" for i in range(4)],
        max_concurrent_sites=2,
        env={"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_SLEEP": "1"},
    )
    summary = tmp_path / "summary.json"

    def check(url: str) -> None:
        env = prefect_env(tmp_path / "client-home", url, **client_settings)
        result = run_cli(["run", "--config", str(config), "--summary-json", str(summary)], env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert json.loads(summary.read_text())["counts"]["succeeded"] == 4
        rows = read_timeline(tmp_path)
        assert len(rows) == 8
        assert max_overlap(rows) == 2

    if kind == "auth":
        check(request.getfixturevalue("auth_server"))
    else:
        with server_for(kind, tmp_path / "server-home") as url:
            check(url)


def test_missing_auth_string_is_one_line_naming_the_setting(
    auth_server: str, tmp_path: Path
) -> None:
    """Basic auth on the server, none on the client: one error line that names the URL and
    PREFECT_API_AUTH_STRING, exit status 1, no traceback, and nothing runs."""
    config = write_config(tmp_path, ["ok-a"])
    env = prefect_env(tmp_path / "client-home", auth_server)
    for args in (["run", "--config", str(config)], ["history"], ["setup", "--config", str(config)]):
        result = run_cli(args, env)
        assert result.returncode == 1, (args, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert auth_server in lines[0] and "PREFECT_API_AUTH_STRING" in lines[0]
        assert "401" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "timeline.tsv").exists()


def test_unreachable_api_is_one_line_naming_the_url_setting(tmp_path: Path) -> None:
    """No server at PREFECT_API_URL: one line naming the URL and PREFECT_API_URL, exit 1."""
    url = f"http://127.0.0.1:{free_port()}/api"
    config = write_config(tmp_path, ["ok-a"])
    result = run_cli(["run", "--config", str(config)], prefect_env(tmp_path / "home", url))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert url in lines[0] and "PREFECT_API_URL" in lines[0]
    assert not (tmp_path / "timeline.tsv").exists()


class _Forbidden(BaseHTTPRequestHandler):
    """Answers every request 403, like a proxy that won't let us through."""

    def _forbid(self) -> None:
        body = b'{"detail": "blocked by proxy"}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _forbid

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_forbidden_api_is_one_line_naming_the_credentials_setting(tmp_path: Path) -> None:
    """An API that answers 403: one line naming the URL, the status and the setting, exit 1."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    try:
        result = run_cli(["history"], prefect_env(tmp_path / "home", url))
    finally:
        server.shutdown()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert url in lines[0] and "403" in lines[0] and "PREFECT_API_AUTH_STRING" in lines[0]


def test_a_server_restart_mid_run_loses_no_site_and_keeps_the_cap(tmp_path: Path) -> None:
    """Restart the server (same database, leases kept in its memory) while 2 pipelines run:
    every site succeeds exactly once, overlap never passes the cap, and no slot stays taken."""
    home, port = tmp_path / "server-home", free_port()
    sites = [f"ok-{i}" for i in range(4)]
    config = write_config(
        tmp_path,
        sites,
        max_concurrent_sites=2,
        concurrency_tag="restart-cap",
        env={"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_SLEEP": "6"},
    )
    summary = tmp_path / "summary.json"
    with prefect_server(home, port=port) as url:
        env = prefect_env(tmp_path / "client-home", url)
        proc = subprocess.Popen(
            [PYTHON, "-m", "flows", "run", "--config", str(config), "--summary-json", str(summary)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        tie_to_this_process(proc)  # it outlives both servers: it must not outlive pytest
        deadline = time.monotonic() + 120
        while len([r for r in read_timeline(tmp_path) if r[1] == "start"]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "2 sites never started"
            time.sleep(0.1)
    # The server is down now, with 2 pipelines running; start it again on the same port.
    with prefect_server(home, port=port) as url:
        try:
            output, _ = proc.communicate(timeout=300)
        finally:
            stop_process_group(proc)  # ended, or stopped if it didn't; the reaper forgets it
        assert proc.returncode == 0, output[-4000:]
        limit = httpx.get(f"{url}/v2/concurrency_limits/restart-cap", timeout=10).json()
    data = json.loads(summary.read_text())
    assert [s["status"] for s in data["sites"]] == ["succeeded"] * 4
    rows = read_timeline(tmp_path)
    assert sorted(r[0] for r in rows if r[1] == "start") == sites  # none lost, none twice
    assert max_overlap(rows) <= 2
    assert limit["active_slots"] == 0, limit
