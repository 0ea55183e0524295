"""The embedded default's local server, kept for the next run (`pipeline.local_server_idle`):
a command's use of it (`join`), `server start`'s hold and `server status`.

With no PREFECT_API_URL, a run used to start a temporary server and stop it at its end: 10-15
s of start-up for every ad hoc run. Here a run starts one local `prefect server start` for
its PREFECT_HOME through a small keeper process (`flows.ops.keeper`) and leaves it running;
the keeper stops it `local_server_idle` seconds after the last run on it ends. The next run
finds it and uses it. With `local_server_idle: 0` (and for a command that is not a run) the
server a command starts has no idle time: the keeper stops it as soon as the last command on
it ends, a killed one included (so a `kill -9` leaves no server behind), and a server that is
up is used as it is (`NO_SAY`).

It is found through `local-server.json` under PREFECT_HOME, never trusted blindly: the
keeper's pid must be alive and be the process that wrote the file (its start time), the
URL must answer `/health`, and the server must be of this Prefect version. A dead or foreign
entry is replaced; a keeper of ours that fails the checks (another version, no answer) is
stopped first. The file, the start and each run's registration happen under
`local-server.lock`, so two runs starting at once start one server between them, and the
keeper takes the same lock before it decides that nobody is left.

Each run on the server holds a file in `local-server.users/` (its pid, start time and
idle seconds); the keeper counts the live ones, so a run that was killed counts as ended.
`site-pipeline server start` holds it through `local-server.hold` instead: until `server
stop`, or until a time. The server's log is `logs/local-server.log` under PREFECT_HOME.

Its UI works: the server listens on Prefect's usual port, `PREFERRED_PORT` (4200), when it
is free, else on the port this home used last, else on a free one; and its UI is told that
same address (the keeper sets the UI's API URL, which Prefect otherwise takes from its
settings' port, 4200, whatever `--port` says).

Its files under PREFECT_HOME are `flows.ops.local_server_files`; whether a recorded server
can be used, `flows.ops.local_server_checks`; starting and stopping a keeper,
`flows.ops.local_server_start`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flows.ops.local_server_checks import verdict
from flows.ops.local_server_files import (
    HOLD_FILE,
    LOG_FILE,
    ServerState,
    held_until,
    idle_until,
    live_users,
    lock,
    read_state,
    register,
    remove_state,
)
from flows.ops.local_server_start import start, stop_keeper


@dataclass
class ServerUse:
    """This run's use of the kept server: `how` it was found, until `leave`."""

    state: ServerState
    how: Literal["started", "reused"]
    idle: float
    user_file: Path

    def leave(self) -> None:
        self.user_file.unlink(missing_ok=True)

    def stops_with_us(self) -> bool:
        """This command started the server and has no say in its idle time (a run with
        `local_server_idle: 0`, or a command that is not a run): the server stops as soon as
        the last command on it ends, most likely this one, so no link to it is worth
        printing."""
        return self.how == "started" and self.idle < 0

    def describe(self) -> str:
        """The one line a command prints about the server it uses."""
        if self.stops_with_us():
            return (
                f"started a local Prefect server at {self.state.url}, its UI at "
                f"{self.state.ui_url}; it stops when the last command on it ends (to keep "
                "one: `pipeline.local_server_idle` above 0, or `site-pipeline server start`)"
            )
        if self.idle < 0:
            return f"using the local Prefect server at {self.state.url}"
        since = time.strftime("%H:%M:%S", time.localtime(self.state.started_at))
        what = (
            f"started a local Prefect server at {self.state.url}"
            if self.how == "started"
            else f"reused the local Prefect server at {self.state.url} (up since {since})"
        )
        return (
            f"{what}, its UI at {self.state.ui_url}; it stays until {self.idle:g} s after the "
            "last run on it ends (`site-pipeline server stop` stops it now)"
        )


def _usable_or_started(
    home: Path, version: str, startup_timeout: float
) -> tuple[ServerState, Literal["started", "reused"]]:
    """Under the lock: the recorded server if it can be used, else a new one (a recorded
    keeper of ours that fails the checks is stopped first)."""
    state = read_state(home)
    if state is not None:
        found = verdict(state, version)
        if found == "ok":
            return state, "reused"
        if found in ("other-version", "no-answer", "wrong-ui"):
            stop_keeper(home, state, timeout=30)
        remove_state(home)
    return start(home, version, startup_timeout), "started"


NO_SAY = -1.0
"""The idle time of a command on the server with no say in how long it stays: a command that
is not a run, or a run with `local_server_idle: 0`. It uses a server that is up as it is
(its stop is as the runs before decided); a server it starts has no idle time: its keeper
stops it as soon as the last command on it ends."""


def join(home: Path, idle: float, version: str, startup_timeout: float) -> ServerUse:
    """The kept server of `home`, found or started, with this command registered on it for
    `idle` seconds after it ends (`NO_SAY`: none of its own, see there). Raises
    `LocalServerFailed` when a started server does not answer within `startup_timeout`
    seconds."""
    with lock(home, timeout=startup_timeout + 60):
        user = register(home, idle)  # before a start: the keeper's first look sees it
        try:
            state, how = _usable_or_started(home, version, startup_timeout)
        except BaseException:
            user.unlink(missing_ok=True)
            raise
        return ServerUse(state, how, idle, user)


def hold(
    home: Path, version: str, startup_timeout: float, idle: float | None
) -> tuple[ServerState, Literal["started", "reused"]]:
    """`server start`: the kept server of `home`, found or started, held until `server stop`
    (`idle` None) or for `idle` seconds from now (then it stops when idle as usual, after
    the last run on it ends). The latest hold replaces an earlier one. Raises
    `LocalServerFailed` when a started server does not answer in time."""
    with lock(home, timeout=startup_timeout + 60):
        user = register(home, NO_SAY)  # until the hold is written: a command on it
        try:
            state, how = _usable_or_started(home, version, startup_timeout)
            until = None if idle is None else time.time() + idle
            path = home / HOLD_FILE
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"keeper_pid": state.keeper_pid, "until": until}), "utf-8")
            os.replace(tmp, path)
        finally:
            user.unlink(missing_ok=True)
        return state, how


def status(home: Path, version: str) -> tuple[list[str], bool]:
    """What `server status` (and `doctor`) say of `home`'s kept server; True if it is up."""
    state = read_state(home)
    if state is None:
        return [f"local server: none for PREFECT_HOME {home}"], False
    found = verdict(state, version)
    if found in ("dead", "foreign"):
        return [f"local server: none for PREFECT_HOME {home} (the one recorded has ended)"], False
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.started_at))
    lines = [
        f"local server: {state.url} (Prefect {state.version}, keeper pid {state.keeper_pid}, "
        f"up since {since}, log {home / LOG_FILE})"
    ]
    if found != "ok":
        why = {
            "no-answer": "does not answer",
            "wrong-ui": "has a UI that calls another address",
        }.get(found, "is of another Prefect version")
        lines.append(f"  it {why}: the next run replaces it")
    lines.append(f"  UI: {state.ui_url}")
    runs = live_users(home)
    until = idle_until(home, state.keeper_pid)
    held = held_until(home, state.keeper_pid)
    if held == math.inf:
        lines.append("  held by `server start`: it stays until `site-pipeline server stop`")
    elif held is not None and held > time.time():
        at = time.strftime("%H:%M:%S", time.localtime(held))
        lines.append(f"  held by `server start` until {at}")
    if runs:
        lines.append(f"  in use by {len(runs)} command{'s' if len(runs) > 1 else ''}")
    elif until is not None and held != math.inf:
        at = time.strftime("%H:%M:%S", time.localtime(until))
        lines.append(f"  idle: it stops at {at} unless a run uses it")
    return lines, True
