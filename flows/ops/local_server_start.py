"""Starting a keeper (and so a kept local server) for a PREFECT_HOME, and stopping one.

`start` chooses the port (`choose_port`: the home's last one when free, so the UI's address
stays the same, else Prefect's usual one when free), spawns `python -m flows.ops.keeper`
detached from this process, waits until its server answers and records it; `stop_keeper` asks
a recorded keeper to stop (the stop file) and ends it if it does not.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import psutil

from flows.ops.local_server_checks import keeper_alive, listens_on, server_version
from flows.ops.local_server_files import (
    HOLD_FILE,
    LOG_FILE,
    PORT_FILE,
    STOP_FILE,
    ServerState,
    write_state,
)
from flows.process.holders import process_started

PREFERRED_PORT = 4200
"""Prefect's usual port: the kept server's when it is free, so its address stays the same."""


class LocalServerFailed(RuntimeError):
    """The local server did not come up: `what` happened (it exited, or did not answer in
    time), and its `log`."""

    def __init__(self, what: str, log: Path) -> None:
        super().__init__(f"the local Prefect server {what}; its log: {log}")
        self.what = what
        self.log = log


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port` and it can be bound (both asked: on Windows a
    bind can succeed beside a server listening on every address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sys.platform != "win32":  # as uvicorn binds: a port whose last server closed
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (TIME_WAIT) is free
            sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def choose_port(home: Path, preferred: int = PREFERRED_PORT) -> int:
    """The kept server's port: the one `home` used last when free (the links its runs printed
    keep working after an idle stop), else `preferred` when free, else any free port. (A CI
    run's first start of a home got another port because 4200 was held; after the idle stop
    `server start` took 4200 and the printed links pointed nowhere.)"""
    for port in (_last_port(home), preferred):
        if 0 < port < 65536 and port_free(port):
            return port
    return free_port()


def _last_port(home: Path) -> int:
    """The port `home`'s server used last (its port file), or 0 when none is known."""
    try:
        return int((home / PORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0


def start(home: Path, version: str, startup_timeout: float) -> ServerState:
    """Start a keeper (and so a server) for `home` on `choose_port`'s port, wait until it
    answers, record it. When that port was taken meanwhile (another home's server starting
    at the same moment, say; it may be gone again by now), once more: on the port the home
    used last if that is another one and free (its UI's address stays the same), else on a
    free port."""
    port = choose_port(home)
    try:
        return _start_on(home, port, startup_timeout)
    except LocalServerFailed as failed:
        if failed.what != _EXITED or (port_free(port) and not _port_was_taken(failed.log)):
            raise
    return _start_on(home, retry_port(home, port), startup_timeout)


def retry_port(home: Path, taken: int) -> int:
    """The port for a second start after `taken` was taken: the one `home` used last when it
    is another one and free, else any free port. (A CI run's `server start` after an idle stop
    came back on a new address: 4200 was free when chosen and taken by another home's server
    a moment later, and the retry took any free port, not the home's own.)"""
    last = _last_port(home)
    if 0 < last < 65536 and last != taken and port_free(last):
        return last
    return free_port()


_PORT_TAKEN = (
    b"address already in use",  # uvicorn, POSIX
    b"only one usage of each socket address",  # uvicorn, Windows
    b"is already in use. please specify a different port",  # `prefect server start`'s check
    b"already running on port",  # the same check, for a server of Prefect's own PID file
)
"""What the server's log ends with when its port was taken, its spaces and line breaks made
one space (Prefect's own messages come wrapped to the terminal's width). A CI run failed on
the third: Prefect checks the port itself before uvicorn tries it."""


def _port_was_taken(log: Path) -> bool:
    """The server's last start failed to listen: its port was taken."""
    try:
        with open(log, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 8192))
            tail = b" ".join(file.read().lower().split())
    except OSError:
        return False
    return any(words in tail for words in _PORT_TAKEN)


_EXITED = "exited before it answered"


def _start_on(home: Path, port: int, startup_timeout: float) -> ServerState:
    url = f"http://127.0.0.1:{port}/api"
    (home / STOP_FILE).unlink(missing_ok=True)
    (home / HOLD_FILE).unlink(missing_ok=True)
    log_path = home / LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "flows.ops.keeper", "--home", str(home), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    # the keeper is this code, wherever it was imported from (an install, a checkout)
    ours = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ours, env.get("PYTHONPATH")]))
    with open(log_path, "ab") as log:
        keeper = _spawn_detached(argv, log, env, home)
    started = process_started(keeper.pid) or 0.0
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if keeper.poll() is not None:
            break
        if not _accepts(port):  # not listening yet: no HTTP client made for nothing
            time.sleep(0.1)
            continue
        answered = server_version(url, timeout=2)
        # an answer from a server that is not the keeper's (another one got the port first)
        # is no answer: ours then exits, unable to listen there
        if answered is not None and listens_on(keeper.pid, port) is not False:
            state = ServerState(url, port, keeper.pid, started, answered, time.time())
            write_state(home, state)
            (home / PORT_FILE).write_text(str(port), encoding="utf-8")
            return state
        time.sleep(0.2)
    if keeper.poll() is None:
        (home / STOP_FILE).touch()
        _wait_gone(keeper.pid, 15)
        _kill(keeper.pid)
        raise LocalServerFailed(f"did not answer within {startup_timeout:g} s", log_path)
    raise LocalServerFailed(_EXITED, log_path)


def _accepts(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:`port` (uvicorn listens once its app has
    started). Asked before each HTTP check while a server starts: each check makes an HTTP
    client (about 30 ms of CPU, its TLS context), and a start polled that way spent seconds
    of CPU beside the server's own start on a fresh home (`bench/zero_idle.py`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def stop_keeper(home: Path, state: ServerState, timeout: float) -> bool:
    """Ask the recorded keeper to stop its server (the stop file), then end it if it does
    not; True when it is gone. A keeper that is not the recorded one is left alone."""
    if not keeper_alive(state):
        return True
    (home / STOP_FILE).touch()
    if _wait_gone(state.keeper_pid, timeout):
        return True
    _kill(state.keeper_pid)
    return _wait_gone(state.keeper_pid, 5)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_started(pid) is None:
            return True
        time.sleep(0.1)
    return process_started(pid) is None


def _kill(pid: int) -> None:
    try:
        psutil.Process(pid).kill()
    except psutil.Error:
        pass


def _spawn_detached(
    argv: list[str], log: IO[bytes], env: dict[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    """Start `argv` so that it outlives this process and its terminal's Ctrl-C: a new
    session on POSIX; on Windows a detached process in its own group, out of our Job Object
    where the job allows it."""
    if sys.platform == "win32":
        flags = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP
        try:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=cwd,
                creationflags=flags | subprocess.CREATE_BREAKAWAY_FROM_JOB,
            )  # fmt: skip
        except PermissionError:  # a job that allows no breakaway
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=cwd,
                creationflags=flags,
            )  # fmt: skip
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=cwd,
        close_fds=True, start_new_session=True,
    )  # fmt: skip
