"""The kept local server's files under PREFECT_HOME: its record (`local-server.json`), the lock
that the record, a start and each run's registration happen under, the runs on it
(`local-server.users/`), and the hold and idle files.

Plain Python, no Prefect and no HTTP: the keeper (`flows.ops.keeper`) reads and writes them
too. What they mean together is told in `flows.ops.local_server`.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from flows.process.holders import process_started, same_process

STATE_FILE = "local-server.json"
LOCK_FILE = "local-server.lock"
USERS_DIR = "local-server.users"
STOP_FILE = "local-server.stop"
IDLE_FILE = "local-server.idle"  # the keeper's {"keeper_pid", "until"}: when it stops if idle
HOLD_FILE = "local-server.hold"  # `server start`'s {"keeper_pid", "until"}: null until stopped
PORT_FILE = "local-server.port"  # the port this home's server last listened on
LOG_FILE = Path("logs") / "local-server.log"


@dataclass(frozen=True)
class ServerState:
    """What `local-server.json` records of the kept server."""

    url: str  # http://127.0.0.1:<port>/api
    port: int
    keeper_pid: int
    keeper_started: float  # the keeper's process start time (psutil's create_time)
    version: str  # the Prefect version that started it
    started_at: float  # time.time() when it first answered

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @property
    def ui_url(self) -> str:
        """Where the server's UI is: http://127.0.0.1:<port>."""
        return ui_url_of(self.url)


def ui_url_of(api_url: str) -> str:
    """The UI's address of the server whose API is `api_url` (its `/api` dropped)."""
    return api_url.rstrip("/").removesuffix("/api")


def read_state(home: Path) -> ServerState | None:
    """The recorded server, or None when there is none or the file is not ours to read."""
    try:
        data = json.loads((home / STATE_FILE).read_text(encoding="utf-8"))
        return ServerState(
            url=str(data["url"]),
            port=int(data["port"]),
            keeper_pid=int(data["keeper_pid"]),
            keeper_started=float(data["keeper_started"]),
            version=str(data["version"]),
            started_at=float(data["started_at"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_state(home: Path, state: ServerState) -> None:
    path = home / STATE_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(state.to_json(), encoding="utf-8")
    os.replace(tmp, path)


def remove_state(home: Path, keeper_pid: int | None = None) -> None:
    """Remove the state file (only if it still names `keeper_pid`, when given)."""
    if keeper_pid is not None:
        state = read_state(home)
        if state is None or state.keeper_pid != keeper_pid:
            return
    (home / STATE_FILE).unlink(missing_ok=True)


def lock(home: Path, timeout: float) -> FileLock:
    home.mkdir(parents=True, exist_ok=True)
    return FileLock(str(home / LOCK_FILE), timeout=timeout)


@dataclass(frozen=True)
class User:
    """One run on the kept server: the file it holds in `local-server.users/`."""

    pid: int
    started: float
    idle: float  # seconds to keep the server after it ends; -1: no say (not a run)
    path: Path


def register(home: Path, idle: float) -> Path:
    """Record this process as a run on the server; the file goes when `leave` is called
    (or counts as gone once this process has died)."""
    users = home / USERS_DIR
    users.mkdir(parents=True, exist_ok=True)
    me = os.getpid()
    path = users / f"{me}-{uuid.uuid4().hex[:8]}.json"
    started = process_started(me) or 0.0
    path.write_text(json.dumps({"pid": me, "started": started, "idle": idle}), encoding="utf-8")
    return path


def live_users(home: Path) -> list[User]:
    """The runs on the server whose process still runs; a dead one's file is removed."""
    live: list[User] = []
    for path in sorted((home / USERS_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            user = User(int(data["pid"]), float(data["started"]), float(data["idle"]), path)
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if same_process(user.pid, user.started):
            live.append(user)
        else:
            path.unlink(missing_ok=True)
    return live


def held_until(home: Path, keeper_pid: int) -> float | None:
    """Until when `server start` holds the server of `keeper_pid` (time.time(); `math.inf`:
    until `server stop`), or None when it does not."""
    data = _keeper_word(home / HOLD_FILE, keeper_pid)
    if data is None:
        return None
    until = data.get("until")
    if until is None:
        return math.inf
    return float(until) if isinstance(until, (int, float)) else None


def write_idle_until(home: Path, keeper_pid: int, until: float | None) -> None:
    """The keeper's word on when it stops (None: runs are on it)."""
    path = home / IDLE_FILE
    tmp = path.with_suffix(f".{keeper_pid}.tmp")
    tmp.write_text(json.dumps({"keeper_pid": keeper_pid, "until": until}), encoding="utf-8")
    os.replace(tmp, path)


def idle_until(home: Path, keeper_pid: int) -> float | None:
    data = _keeper_word(home / IDLE_FILE, keeper_pid)
    until = data.get("until") if data is not None else None
    return float(until) if isinstance(until, (int, float)) else None


def _keeper_word(path: Path, keeper_pid: int) -> dict[str, Any] | None:
    """The hold or idle file at `path` (`{"keeper_pid": ..., "until": ...}`) when it is about
    the server of `keeper_pid`; None when it is missing, unreadable or about another one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("keeper_pid") != keeper_pid:
        return None
    return data
