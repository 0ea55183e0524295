"""Start and stop real services for tests and benchmarks: `prefect server start` on a free
loopback port (SQLite or PostgreSQL), a process worker, and a fresh PostgreSQL database.

Everything started here runs in its own process group and is stopped by group, so teardown
kills only what this module started.

A new Prefect database spends about 6 s of CPU in its migrations, more than the rest of a
server's start. Servers start on a copy of a database migrated once per Prefect version
(`migrated_sqlite`, `postgres_database`'s template), so each test pays that once per
machine, not once per server. A test of a new user's first run asks for `fresh=True`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from filelock import FileLock

from flows.process import groups as procgroup
from tests.support.processes import stop_tied

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events import Event

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
BIN = Path(sys.executable).parent


def _prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")


TEMPLATES = Path(tempfile.gettempdir()) / f"site-pipeline-test-databases-{_prefect_version()}"
"""Where the migrated template databases of this Prefect version live, shared by every test
session and pytest-xdist worker on this machine (made under a file lock)."""
PG_TEMPLATE = "site_pipeline_template_" + _prefect_version().replace(".", "_").replace("+", "_")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tie_to_this_process(proc: subprocess.Popen[bytes]) -> None:
    """End the process group `proc` leads (started with `start_new_session=True`) when this
    process dies, however it dies (a SIGKILL'd pytest too): the product's reaper
    (`flows.process.groups`) is told of it, as the product tells it of its own servers."""
    procgroup.reap_group_on_exit(proc.pid)


stop_process_group = stop_tied
"""SIGTERM the process group `proc` leads, then SIGKILL after `grace` seconds; the reaper
forgets it (its number may be reused)."""


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


def _pg_url(name: str) -> str:
    return f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


def _pg_admin(sql: str, *args: object) -> list[object]:
    """Run one statement on the `postgres` database; the rows' first column."""
    import asyncpg

    async def run() -> list[object]:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
        try:
            if not args:  # DDL: the simple protocol (CREATE DATABASE takes no parameters)
                await conn.execute(sql)
                return []
            return [row[0] for row in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


def _migrate(database_url: str, home: Path) -> None:
    """`prefect server database upgrade -y` on `database_url` (a new, empty database)."""
    home.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [str(BIN / "prefect"), "server", "database", "upgrade", "-y"],
        env=prefect_env(home, PREFECT_API_DATABASE_CONNECTION_URL=database_url),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"migrating {database_url} failed:\n{done.stdout}{done.stderr}"[-3000:])


def migrated_sqlite() -> Path:
    """An empty SQLite database with this Prefect version's migrations applied (made once
    per machine and version, under `TEMPLATES`): copy it, never open it."""
    TEMPLATES.mkdir(parents=True, exist_ok=True)
    path = TEMPLATES / "prefect.db"
    with FileLock(str(TEMPLATES / "sqlite.lock")):
        if not path.exists():
            making = TEMPLATES / f"making-{os.getpid()}.db"
            _migrate(f"sqlite+aiosqlite:///{making}", TEMPLATES / f"home-{os.getpid()}")
            with sqlite3.connect(making) as conn:  # everything in the file, none in a -wal
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            os.replace(making, path)
    return path


def seed_home(home: Path) -> Path:
    """`home` as a PREFECT_HOME whose default database (`prefect.db`) is already migrated:
    the embedded default's temporary server, or `prefect server start`, starts on it
    without the migrations' cost. Leaves a database that is there alone."""
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "prefect.db").exists():
        shutil.copyfile(migrated_sqlite(), home / "prefect.db")
    return home


def _postgres_template() -> str:
    """The name of a PostgreSQL database migrated for this Prefect version, the template
    of every `postgres_database` (made once per server and version)."""
    TEMPLATES.mkdir(parents=True, exist_ok=True)
    with FileLock(str(TEMPLATES / "postgres.lock")):
        if not _pg_admin("SELECT datname FROM pg_database WHERE datname = $1", PG_TEMPLATE):
            making = f"{PG_TEMPLATE}_making_{os.getpid()}"
            _pg_admin(f'DROP DATABASE IF EXISTS "{making}" WITH (FORCE)')
            _pg_admin(f'CREATE DATABASE "{making}"')
            _migrate(_pg_url(making), TEMPLATES / f"home-{os.getpid()}")
            _pg_admin(f'ALTER DATABASE "{making}" RENAME TO "{PG_TEMPLATE}"')
    return PG_TEMPLATE


@contextmanager
def postgres_database(fresh: bool = False) -> Iterator[str]:
    """A database of its own for one run, already migrated (a copy of `_postgres_template`)
    unless `fresh`; yields its asyncpg URL and drops it afterwards."""
    name = f"site_pipeline_{uuid.uuid4().hex[:12]}"
    template = "" if fresh else f' TEMPLATE "{_postgres_template()}"'
    for attempt in range(20):  # a template being copied by another worker is "in use"
        try:
            _pg_admin(f'CREATE DATABASE "{name}"{template}')
            break
        except Exception as exc:
            if "is being accessed by other users" not in str(exc) or attempt == 19:
                raise
            time.sleep(0.25)
    try:
        yield _pg_url(name)
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
    fresh: bool = False,
) -> Iterator[str]:
    """`prefect server start` on loopback (a free port unless given), with extra server
    `settings` (e.g. CSRF protection, an auth string); yields the API URL. On SQLite its
    database starts migrated (`seed_home`) unless `fresh`."""
    home.mkdir(parents=True, exist_ok=True)
    if database_url is None and not fresh:
        seed_home(home)
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


def events_named(client: SyncPrefectClient, name: str, since: datetime) -> list[Event]:
    """Every event called `name` since `since`, all pages."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    page = client.read_events(
        EventFilter(
            event=EventNameFilter(name=[name]),
            occurred=EventOccurredFilter(since=since),
        ),
        limit=50,
    )
    events: list[Event] = list(page.events)
    while page.next_page is not None:
        page = client.read_events_page(str(page.next_page))
        events.extend(page.events)
    return events


def embedded_env(home: Path) -> dict[str, str]:
    """No PREFECT_API_URL, `home` already migrated: the embedded default on a user's machine."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    project = Path(__file__).resolve().parents[2]
    return {**env, "PREFECT_HOME": str(seed_home(home)), "PYTHONPATH": str(project)}
