"""The keeper of a kept local server: `python -m flows.ops.keeper --home H --port P`.

Started detached by `flows.ops.local_server.start`. It starts `prefect server start` on
127.0.0.1:P for PREFECT_HOME H (its output goes to the keeper's, the log file), then every
`CHECK_SECONDS` counts the live runs on it (`local_server.live_users`). When none is left
for the idle seconds of the last one to leave, it takes the lock, looks once more, removes
the state file and stops the server: SIGTERM to its process group (Ctrl-Break on Windows),
then a kill of what is left after `STOP_GRACE` seconds. `site-pipeline server stop` asks the
same through the stop file; a server that exits by itself ends the keeper too. Imports no
Prefect.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from flows.ops import local_server as ls
from flows.process import groups as procgroup
from flows.process import trees as proctree

CHECK_SECONDS = 0.5
STOP_GRACE = 10.0


def server_argv(port: int) -> list[str]:
    return [
        sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip


def start_server(port: int) -> subprocess.Popen[bytes]:
    """`prefect server start` in its own process group, which ends with the keeper however
    the keeper ends (the reaper on POSIX, the Job Object on Windows)."""
    if sys.platform == "win32":
        server = subprocess.Popen(
            server_argv(port),
            stdin=subprocess.DEVNULL,
            close_fds=True,
            creationflags=subprocess.CREATE_NEW_PROCESS_GROUP,
        )
    else:
        server = subprocess.Popen(
            server_argv(port), stdin=subprocess.DEVNULL, close_fds=True, start_new_session=True
        )
    try:
        if sys.platform == "win32":
            proctree.end_with_us(server.pid)
        else:
            procgroup.reap_group_on_exit(server.pid)
    except OSError:
        server.kill()  # it could not be tied to us: it must not outlive us unseen
        server.wait()
        raise
    return server


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """End the server and everything it started: politely, then by force."""
    try:
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    if server.poll() is None:
        try:
            if sys.platform == "win32":  # fails without a console (a detached keeper): kill
                server.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                os.killpg(server.pid, signal.SIGTERM)
        except OSError:
            pass  # gone meanwhile, or no way to ask: the kill below ends it
    _, alive = psutil.wait_procs(tree, timeout=STOP_GRACE)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    server.wait()


def idle_after(idle: float, users: list[ls.User], new_spell: bool) -> float:
    """The seconds the server stays once `users` (on it now) are gone: the largest idle time
    of the runs of this busy spell; a command that is not a run (idle -1) has no say, and a
    new spell's runs replace an earlier spell's idle time (`idle`)."""
    runs = [user.idle for user in users if user.idle >= 0]
    if not runs:
        return idle
    return max(runs) if new_spell else max(idle, *runs)


def keep(home: Path, port: int) -> int:
    server = start_server(port)
    me = os.getpid()
    idle = 0.0
    empty_since: float | None = None
    first = True
    stop_file = home / ls.STOP_FILE
    try:
        while server.poll() is None:
            time.sleep(CHECK_SECONDS)
            if stop_file.exists():
                stop_file.unlink(missing_ok=True)
                break
            users = ls.live_users(home)
            if users:
                new_spell = empty_since is not None or first
                idle = idle_after(idle, users, new_spell)
                if new_spell:
                    ls.write_idle_until(home, me, None)
                first = False
                empty_since = None
                continue
            now = time.monotonic()
            if empty_since is None:
                empty_since = now
                ls.write_idle_until(home, me, time.time() + idle)
            if now - empty_since < idle:
                continue
            with ls.lock(home, timeout=60):  # a run starting now waits, then starts anew
                if ls.live_users(home):
                    continue
                ls.remove_state(home, keeper_pid=me)
                break
    finally:
        ls.remove_state(home, keeper_pid=me)
        stop_server(server)
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)  # `keep`'s finally stops the server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.ops.keeper")
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--port", required=True, type=int)
    args = parser.parse_args(argv)
    if sys.platform != "win32":  # `server stop` uses the stop file; a SIGTERM does the same
        signal.signal(signal.SIGTERM, _exit_on_signal)
    return keep(args.home, args.port)


if __name__ == "__main__":
    sys.exit(main())
