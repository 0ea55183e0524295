"""The keeper of a kept local server: `python -m flows.ops.keeper --home H --port P`.

Started detached by `flows.ops.local_server_start.start`. It starts `prefect server start` on
127.0.0.1:P for PREFECT_HOME H (its output goes to the keeper's, the log file), its UI told
to call that same address (`server_env`), then every `CHECK_SECONDS` counts the live runs
on it (`local_server_files.live_users`). When none is left for the idle seconds of the last one
to leave, and no `server start` holds it (`local_server_files.held_until`), it takes the lock,
looks once more, removes the state file and stops the server, still under the lock (so a
run that starts next finds its port free): SIGTERM to its process group (Ctrl-Break on
Windows), then a kill of what is left after `STOP_GRACE` seconds; on POSIX the reaper then
forgets the group. `site-pipeline server stop` asks the same through the stop file; a
server that exits by itself ends the keeper too. Imports no Prefect.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from flows.ops import local_server_files as server_files
from flows.process import groups as procgroup
from flows.process import trees as proctree

CHECK_SECONDS = 0.5
STOP_GRACE = 10.0


def server_argv(port: int) -> list[str]:
    return [
        sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip


def server_env(port: int) -> dict[str, str]:
    """The server's environment: ours, with its UI's API URL set to its own address. Prefect
    takes that URL from its settings' port (4200) when it is not set, whatever `--port` says,
    and the UI served on another port then calls a port where nothing answers."""
    env = {k: v for k, v in os.environ.items() if k not in _UI_API_URL_NAMES}
    env["PREFECT_SERVER_UI_API_URL"] = f"http://127.0.0.1:{port}/api"
    return env


_UI_API_URL_NAMES = ("PREFECT_SERVER_UI_API_URL", "PREFECT_UI_API_URL")


def start_server(port: int) -> subprocess.Popen[bytes]:
    """`prefect server start` in its own process group, which ends with the keeper however
    the keeper ends (the reaper on POSIX, the Job Object on Windows)."""
    if sys.platform == "win32":
        server = subprocess.Popen(
            server_argv(port),
            stdin=subprocess.DEVNULL,
            close_fds=True,
            env=server_env(port),
            creationflags=subprocess.CREATE_NEW_PROCESS_GROUP,
        )
    else:
        server = subprocess.Popen(
            server_argv(port),
            stdin=subprocess.DEVNULL,
            close_fds=True,
            env=server_env(port),
            start_new_session=True,
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
    grace = STOP_GRACE
    if server.poll() is None:
        try:
            if sys.platform == "win32":  # fails without a console (a detached keeper): kill
                server.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                os.killpg(server.pid, signal.SIGTERM)
        except Exception:  # gone meanwhile, or no way to ask (CPython 3.11's os.kill raises
            grace = 0.0  # SystemError when Ctrl-Break can't be sent): the kill below, now
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    server.wait()


def idle_after(idle: float, users: list[server_files.User], new_spell: bool) -> float:
    """The seconds the server stays once `users` (on it now) are gone: the largest idle time
    of the runs of this busy spell; a command that is not a run (idle -1) has no say, and a
    new spell's runs replace an earlier spell's idle time (`idle`)."""
    runs = [user.idle for user in users if user.idle >= 0]
    if not runs:
        return idle
    return max(runs) if new_spell else max(idle, *runs)


def stop_and_forget(server: subprocess.Popen[bytes]) -> None:
    """`stop_server`, then (POSIX) the reaper forgets the server's group: it would otherwise
    hold it, and at the keeper's exit linger 5 s to signal a group that is gone (or whose
    number is reused)."""
    stop_server(server)
    if sys.platform != "win32":
        procgroup.forget_group(server.pid)


def keep(home: Path, port: int) -> int:
    # A SIGTERM while the server starts (before `try`, while it is being tied to the reaper)
    # would leave it running unseen: it waits until the server is ours to stop.
    held = _hold_sigterm()
    server = start_server(port)
    me = os.getpid()
    idle = 0.0
    quiet_until: float | None = None  # time.time() when the idle time of the last run ends
    first = True
    stop_file = home / server_files.STOP_FILE
    said: float | None = -1.0  # what the idle file says
    stopped = False
    try:
        _release_sigterm(held)  # one that came meanwhile ends us here, and `finally` stops it
        while server.poll() is None:
            time.sleep(CHECK_SECONDS)
            if stop_file.exists():
                stop_file.unlink(missing_ok=True)
                break
            users = server_files.live_users(home)
            if users:
                new_spell = quiet_until is not None or first
                idle = idle_after(idle, users, new_spell)
                if new_spell and said is not None:
                    server_files.write_idle_until(home, me, None)
                    said = None
                first = False
                quiet_until = None
                continue
            if quiet_until is None:
                quiet_until = time.time() + idle
            until = max(quiet_until, server_files.held_until(home, me) or 0.0)
            if until != said and until != math.inf:
                server_files.write_idle_until(home, me, until)
                said = until
            if time.time() < until:
                continue
            with server_files.lock(home, timeout=60):  # a run starting now waits, then starts anew
                if (
                    server_files.live_users(home)
                    or (server_files.held_until(home, me) or 0.0) > time.time()
                ):
                    continue
                server_files.remove_state(home, keeper_pid=me)
                stop_and_forget(server)  # under the lock: the next run finds the port free
                stopped = True
                break
    finally:
        server_files.remove_state(home, keeper_pid=me)
        if not stopped:
            stop_and_forget(server)
    return 0


_Held = tuple[list[int], Any]


def _hold_sigterm() -> _Held:
    """Until `_release_sigterm`, a SIGTERM is noted, not acted on (POSIX); what it replaced.
    Not a blocked signal mask: the server started meanwhile would inherit it, ignore the
    SIGTERM that asks it to stop, and be killed after `STOP_GRACE` at every stop (10 s more
    under the lock, and no clean shutdown)."""
    came: list[int] = []
    if sys.platform == "win32":
        return came, None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: came.append(signum))
    return came, previous


def _release_sigterm(held: _Held) -> None:
    """The handler `_hold_sigterm` replaced is back; a SIGTERM that came meanwhile is
    raised again now, for it."""
    came, previous = held
    if sys.platform == "win32":
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if came:
        signal.raise_signal(signal.SIGTERM)


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
