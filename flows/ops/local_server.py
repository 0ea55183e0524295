"""The embedded default's local server, kept for the next run (`pipeline.local_server_idle`).

With no PREFECT_API_URL, a run used to start a temporary server and stop it at its end: 10-15
s of start-up for every ad hoc run. Here a run starts one local `prefect server start` for
its PREFECT_HOME through a small keeper process (`flows.ops.keeper`) and leaves it running;
the keeper stops it `local_server_idle` seconds after the last run on it ends. The next run
finds it and uses it.

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
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Literal

import httpx
import psutil
from filelock import FileLock

from flows.process.holders import process_started, same_process

STATE_FILE = "local-server.json"
LOCK_FILE = "local-server.lock"
USERS_DIR = "local-server.users"
STOP_FILE = "local-server.stop"
IDLE_FILE = "local-server.idle"  # the keeper's {"keeper_pid", "until"}: when it stops if idle
HOLD_FILE = "local-server.hold"  # `server start`'s {"keeper_pid", "until"}: null until stopped
PORT_FILE = "local-server.port"  # the port this home's server last listened on
PREFERRED_PORT = 4200
"""Prefect's usual port: the kept server's when it is free, so its address stays the same."""
LOG_FILE = Path("logs") / "local-server.log"
CHECK_TIMEOUT = 5.0
"""Seconds a health or version request to a recorded server may take."""

Verdict = Literal["ok", "dead", "foreign", "other-version", "no-answer", "wrong-ui"]


class LocalServerFailed(RuntimeError):
    """The local server did not come up: `what` happened (it exited, or did not answer in
    time), and its `log`."""

    def __init__(self, what: str, log: Path) -> None:
        super().__init__(f"the local Prefect server {what}; its log: {log}")
        self.what = what
        self.log = log


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


def keeper_alive(state: ServerState) -> bool:
    """The recorded keeper still runs: its pid is alive and started when the file says."""
    return same_process(state.keeper_pid, state.keeper_started)


def server_version(url: str, timeout: float = CHECK_TIMEOUT) -> str | None:
    """The version of the Prefect server at `url` if it answers healthy, else None."""
    try:
        with httpx.Client(timeout=timeout) as client:
            health = client.get(f"{url}/health")
            if health.status_code != 200:
                return None
            version = client.get(f"{url}/admin/version")
            if version.status_code != 200:
                return None
            answer = version.json()
    except (httpx.HTTPError, ValueError):
        return None
    return answer if isinstance(answer, str) else None


def ui_api_url(url: str, timeout: float = CHECK_TIMEOUT) -> str | None:
    """The API URL that the UI of the server at `url` calls (its `/ui-settings`), or None
    when it has no UI or does not say."""
    try:
        with httpx.Client(timeout=timeout) as client:
            answer = client.get(f"{ui_url_of(url)}/ui-settings")
            if answer.status_code != 200:
                return None
            data = answer.json()
    except (httpx.HTTPError, ValueError):
        return None
    found = data.get("api_url") if isinstance(data, dict) else None
    return found if isinstance(found, str) else None


def verdict(state: ServerState, version: str) -> Verdict:
    """Whether the recorded server can be used by a run of Prefect `version`: a server whose
    UI calls another address (as the keepers before the UI's fix started) is replaced too."""
    if not keeper_alive(state):
        return "dead" if server_version(state.url) is None else "foreign"
    answered = server_version(state.url)
    if answered is None:
        return "no-answer"
    if answered != version or state.version != version:
        return "other-version"
    ui_calls = ui_api_url(state.url)
    if ui_calls is not None and ui_calls.rstrip("/") != state.url.rstrip("/"):
        return "wrong-ui"
    return "ok"


@dataclass(frozen=True)
class User:
    """One run on the kept server: the file it holds in `local-server.users/`."""

    pid: int
    started: float
    idle: float  # seconds to keep the server after it ends; -1: no say (not a run)
    path: Path


def register(home: Path, idle: float) -> Path:
    """Record this process as a run on the server; the file goes when `release` is called
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
    """The kept server's port: `preferred` when free, else the one `home` used last when
    free, else any free port."""
    candidates = [preferred]
    try:
        candidates.append(int((home / PORT_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    for port in candidates:
        if 0 < port < 65536 and port_free(port):
            return port
    return free_port()


@dataclass
class Lease:
    """This run's use of the kept server: `how` it was found, until `release`."""

    state: ServerState
    how: Literal["started", "reused"]
    idle: float
    user_file: Path

    def release(self) -> None:
        self.user_file.unlink(missing_ok=True)

    def describe(self) -> str:
        """The one line a run prints about the server it uses."""
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


def acquire(home: Path, idle: float, version: str, startup_timeout: float) -> Lease:
    """The kept server of `home`, found or started, with this run registered on it.
    Raises `LocalServerFailed` when a started server does not answer within
    `startup_timeout` seconds."""
    with lock(home, timeout=startup_timeout + 60):
        user = register(home, idle)  # before a start: the keeper's first look sees it
        try:
            state, how = _usable_or_started(home, version, startup_timeout)
        except BaseException:
            user.unlink(missing_ok=True)
            raise
        return Lease(state, how, idle, user)


def hold(
    home: Path, version: str, startup_timeout: float, idle: float | None
) -> tuple[ServerState, Literal["started", "reused"]]:
    """`server start`: the kept server of `home`, found or started, held until `server stop`
    (`idle` None) or for `idle` seconds from now (then it stops when idle as usual, after
    the last run on it ends). The latest hold replaces an earlier one. Raises
    `LocalServerFailed` when a started server does not answer in time."""
    with lock(home, timeout=startup_timeout + 60):
        user = register(home, -1)  # until the hold is written: a command on it, without a say
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


def held_until(home: Path, keeper_pid: int) -> float | None:
    """Until when `server start` holds the server of `keeper_pid` (time.time(); `math.inf`:
    until `server stop`), or None when it does not."""
    try:
        data = json.loads((home / HOLD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("keeper_pid") != keeper_pid:
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
    try:
        data = json.loads((home / IDLE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("keeper_pid") != keeper_pid:
        return None
    until = data.get("until")
    return float(until) if isinstance(until, (int, float)) else None


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


def reuse(home: Path, version: str) -> Lease | None:
    """The kept server of `home` if it is up and usable, with this command registered on it
    (without a say in its idle time); None otherwise. Starts nothing."""
    with lock(home, timeout=60):
        state = read_state(home)
        if state is None or verdict(state, version) != "ok":
            return None
        return Lease(state, "reused", -1, register(home, -1))


def start(home: Path, version: str, startup_timeout: float) -> ServerState:
    """Start a keeper (and so a server) for `home` on `choose_port`'s port, wait until it
    answers, record it. When that port was taken meanwhile (another home's server starting
    at the same moment, say; it may be gone again by now), once more on a free port."""
    port = choose_port(home)
    try:
        return _start_on(home, port, startup_timeout)
    except LocalServerFailed as failed:
        if failed.what != _EXITED or (port_free(port) and not _port_was_taken(failed.log)):
            raise
    return _start_on(home, free_port(), startup_timeout)


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


def listens_on(pid: int, port: int) -> bool | None:
    """Whether `pid` or a process under it listens on TCP `port`; None when that can't be
    seen (a process we may not look into)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in tree:
        try:
            found = proc.net_connections(kind="tcp")
        except psutil.AccessDenied:
            return None
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in found):
            return True
    return False


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
