"""Start and stop real services for tests and benchmarks: `prefect server start` on a free
loopback port (SQLite or PostgreSQL), a process worker, and a fresh PostgreSQL database.

Everything started here runs in its own process group and is stopped by group, so teardown
kills only what this module started.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from flows.process import groups as procgroup

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tie_to_this_process(proc: subprocess.Popen[bytes]) -> None:
    """End the process group `proc` leads (started with `start_new_session=True`) when this
    process dies, however it dies (a SIGKILL'd pytest too): the product's reaper
    (`flows.process.groups`) is told of it, as the product tells it of its own servers."""
    procgroup.reap_group_on_exit(proc.pid)


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL after `grace` seconds; the
    reaper forgets it (its number may be reused)."""
    try:
        _stop_group(proc, grace)
    finally:
        procgroup.forget_group(proc.pid)


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def postgres_problem() -> str | None:
    """Why PostgreSQL on 127.0.0.1:5432 can't be used, or None when it can."""
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - prefect depends on asyncpg
        return "asyncpg is not installed"

    async def probe() -> None:
        conn = await asyncpg.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres", timeout=5
        )
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return f"PostgreSQL at {PG_HOST}:{PG_PORT} (user {PG_USER}) is not reachable: {exc}"
    return None


def postgres_or_skip() -> None:
    """Skip the test with the reason when PostgreSQL can't be reached; with
    REQUIRE_POSTGRES=1 (CI) fail it instead."""
    import pytest

    problem = postgres_problem()
    if problem:
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(f"REQUIRE_POSTGRES=1 but {problem}")
        pytest.skip(problem)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty database for one run; yields its asyncpg URL and drops it afterwards."""
    import asyncpg

    name = f"site_pipeline_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def prefect_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """An environment isolated in `home`, pointing at `api_url` if given."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_") and key != "SITE_PIPELINE_CONFIG"
    }
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env


def wait_for_health(
    url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float, what: str = "prefect server"
) -> None:
    """Wait until the API at `url` answers its health check; raise with the end of `log`
    when `proc` exits first, or when `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n" + log.read_text()[-3000:])
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer on {url} in {timeout}s")
        time.sleep(0.25)


@contextmanager
def prefect_server(
    home: Path,
    database_url: str | None = None,
    startup_timeout: float = 180,
    *,
    port: int | None = None,
    settings: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """`prefect server start` on loopback (a free port unless given), with extra server
    `settings` (e.g. CSRF protection, an auth string); yields the API URL."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    extra = {"PREFECT_API_DATABASE_CONNECTION_URL": database_url} if database_url else {}
    extra.update(settings or {})
    log = (home / "server.log").open("ab")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=prefect_env(home, **extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tie_to_this_process(proc)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_health(url, proc, home / "server.log", startup_timeout)
        yield url
    finally:
        stop_process_group(proc)
        log.close()


@contextmanager
def process_worker(env: Mapping[str, str], pool: str, cwd: Path, log_path: Path) -> Iterator[None]:
    """`prefect worker start --pool POOL` for the duration of the block."""
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool],
        env=dict(env),
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tie_to_this_process(proc)
    try:
        yield
    finally:
        stop_process_group(proc)
        log.close()
