"""Prefect's scaled server for tests: PostgreSQL, Redis through `prefect-redis`, the API
started with `--no-services` and the background services in a process of their own (Prefect's
guide "How to scale self-hosted Prefect"), plus a TCP proxy to cut a backend for a while.

Each test gets a private `redis-server` (no persistence) on a free port, so its data starts
empty and "Redis down" is stopping it. Every process started here leads its own process
group, is tied to the test process (`tests.support.servers.tie_to_this_process`) and is stopped by
group.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tests.support.servers import (
    BIN,
    free_port,
    postgres_database,
    prefect_env,
    stop_process_group,
    tie_to_this_process,
    wait_for_health,
)

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

LEASE_STORAGE = "prefect_redis.lease_storage"


def redis_problem() -> str | None:
    """Why Redis can't be used for these tests (Redis at 127.0.0.1:6379 does not answer a
    PING, or there is no `redis-server` binary for a private one), or None when it can."""
    import redis

    try:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"Redis at {REDIS_HOST}:{REDIS_PORT} is not reachable: {exc}"
    if shutil.which("redis-server") is None:
        return "no `redis-server` on PATH to start a private Redis for the test"
    return None


def redis_or_skip() -> None:
    """Skip the test with the reason when Redis can't be used; with REQUIRE_REDIS=1 (CI)
    fail it instead."""
    import pytest

    problem = redis_problem()
    if problem:
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail(f"REQUIRE_REDIS=1 but {problem}")
        pytest.skip(problem)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listened on port {port} in {timeout}s:\n{_tail(log)}")
        time.sleep(0.1)


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


class RedisServer:
    """A private `redis-server --save ""` on a free loopback port, which a test may stop
    (Redis down) and start again (empty: nothing is saved)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.log = folder / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            argv += ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        tie_to_this_process(self._proc)
        _wait_for_port(self.port, self._proc, self.log, 30)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process_group(self._proc, grace=5)
            self._proc = None


class TcpProxy:
    """A loopback TCP proxy to `target_port`, in threads: `cut()` closes its port and every
    connection through it (the backend looks down), `restore()` listens again on the same
    port."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        for sock in ([listener] if listener else []) + conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def scaled_settings(database_url: str, redis_port: int) -> dict[str, str]:
    """The server settings of Prefect's scaled setup: PostgreSQL, and Redis for the
    messaging broker and cache, causal ordering, the concurrency lease storage and the
    docket (names checked against Prefect 3.9.1 and prefect-redis 0.3.0)."""
    return {
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
        "PREFECT_SERVER_DOCKET_URL": f"redis://127.0.0.1:{redis_port}/0",
        "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
        "PREFECT_REDIS_MESSAGING_PORT": str(redis_port),
        "PREFECT_REDIS_MESSAGING_DB": "0",
        # Fail fast rather than hang on a Redis that went away mid-call.
        "PREFECT_REDIS_MESSAGING_SOCKET_CONNECT_TIMEOUT": "5",
        "PREFECT_REDIS_MESSAGING_SOCKET_TIMEOUT": "10",
    }


class ScaledServer:
    """The API (`prefect server start --no-services`) and the background services
    (`prefect server services start`), two processes on one home and one set of settings;
    the API can be stopped and started again on the same port."""

    def __init__(self, home: Path, settings: dict[str, str]) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = prefect_env(home, **settings)
        self.api_log = home / "api.log"
        self.services_log = home / "services.log"
        self._api: subprocess.Popen[bytes] | None = None
        self._services: subprocess.Popen[bytes] | None = None
        home.mkdir(parents=True, exist_ok=True)

    def _popen(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        tie_to_this_process(proc)
        return proc

    def start_api(self, timeout: float = 120) -> None:
        argv = [str(BIN / "prefect"), "server", "start", "--no-services", "--host", "127.0.0.1"]
        self._api = self._popen([*argv, "--port", str(self.port)], self.api_log)
        wait_for_health(self.url, self._api, self.api_log, timeout, what="the API")

    def stop_api(self) -> None:
        if self._api is not None:
            stop_process_group(self._api)
            self._api = None

    def start_services(self) -> None:
        argv = [str(BIN / "prefect"), "server", "services", "start"]
        self._services = self._popen(argv, self.services_log)
        time.sleep(1)
        if self._services.poll() is not None:
            raise RuntimeError(f"the services exited:\n{_tail(self.services_log)}")

    def stop_services(self) -> None:
        if self._services is not None:
            stop_process_group(self._services)
            self._services = None

    def logs(self) -> str:
        """Both processes' output so far."""
        return _tail(self.api_log, 10**7) + _tail(self.services_log, 10**7)


@contextmanager
def private_redis(folder: Path) -> Iterator[RedisServer]:
    """A private, empty Redis for one test (see `RedisServer`)."""
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def scaled_server(
    folder: Path, redis_port: int | None = None, database_port: int | None = None
) -> Iterator[ScaledServer]:
    """A fresh PostgreSQL database and the scaled server on it, API and services running.

    Redis is a private one unless `redis_port` is given (the test's own, to stop it);
    `database_port` reaches PostgreSQL through another port (a `TcpProxy`)."""
    with postgres_database() as database_url, _redis_port(folder, redis_port) as port:
        if database_port is not None:
            database_url = database_url.replace(":5432/", f":{database_port}/")
        server = ScaledServer(folder / "server-home", scaled_settings(database_url, port))
        try:
            server.start_api()
            server.start_services()
            yield server
        finally:
            server.stop_services()
            server.stop_api()


@contextmanager
def _redis_port(folder: Path, port: int | None) -> Iterator[int]:
    if port is not None:
        yield port
        return
    with private_redis(folder / "redis") as redis_server:
        yield redis_server.port


def tee(stream: IO[str], path: Path) -> threading.Thread:
    """Copy `stream` (a process's output) to `path` line by line, in a thread."""

    def copy() -> None:
        with path.open("a", encoding="utf-8") as out:
            for line in stream:
                out.write(line)
                out.flush()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def start_cli_run(config: Path, summary: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """`python -m flows run --config CONFIG --summary-json SUMMARY` as its own process group,
    tied to this process (it ends with a killed pytest), output merged on a text pipe."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "flows", "run", "--config", str(config), "--summary-json", str(summary)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    tie_to_this_process(proc)  # type: ignore[arg-type]
    return proc
