"""Which Prefect API the CLI talks to, whether it answers, and the embedded default's
temporary server started early enough to end with us, its own log in a file under
PREFECT_HOME (`logs/temporary-server.log`, the previous run's kept as `.1`), never in the
user's terminal."""

from __future__ import annotations

import atexit
import os
import re
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

import httpx
import prefect
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from flows import _prefect_compat as compat
from flows.ops import local_server, local_server_files, local_server_start
from flows.ops.local_server_checks import keeper_alive
from flows.slots.ledger_home import LOCAL_SERVER_ENV

SERVER_LOG = Path("logs") / "temporary-server.log"
"""The temporary server's log, under PREFECT_HOME; the previous run's is `<name>.1`."""
STARTUP_TIMEOUT = 60
"""Seconds to wait for the temporary server when PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
is not set: Prefect's own 20 s ran out on one run in ten on a loaded 2-core machine."""
MAX_STARTS = 4
"""Server processes one start may use: Prefect starts another on a new port whenever one exits
with status 3 (its port was taken, but also uvicorn's status for any startup failure)."""
TAIL_LINES = 8
_TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


class ApiUnreachable(RuntimeError):
    """No Prefect API can be used; the message names the URL that was tried."""


class ServerStartFailed(ApiUnreachable):
    """The temporary server did not come up: the first line says what happened, with the
    log's path; any further lines are the last lines of that log."""


def api_target() -> str:
    """The configured API URL, or a description of the embedded default."""
    settings = get_current_settings()
    if settings.api.url:
        return str(settings.api.url)
    if not settings.server.ephemeral.enabled:
        raise ApiUnreachable(
            "no Prefect API: PREFECT_API_URL is not set and the embedded local server is "
            "disabled (PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false); start `prefect server start` "
            "and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return "the embedded local server (no PREFECT_API_URL set)"


def check_reachable() -> str:
    """Raise `ApiUnreachable` unless the configured API answers an authenticated request.

    Goes through Prefect's client, so the auth header and the CSRF token are the ones a
    run would send. Returns the target, with the server's version when it has one.
    """
    target = api_target()
    url = get_current_settings().api.url
    if not url:
        return target
    with get_client(sync_client=True) as client:
        try:
            version = client.api_version()
        except httpx.TransportError as exc:
            raise ApiUnreachable(
                f"cannot reach the Prefect API at {url} ({type(exc).__name__}: {exc}); "
                "check PREFECT_API_URL and that the server is running"
            ) from None
        except PrefectHTTPStatusError as exc:
            raise ApiUnreachable(_refusal(str(url), exc.response)) from None
    return f"{target} (Prefect server {version})"


def _refusal(url: str, response: httpx.Response) -> str:
    """What to tell the user when the API answered with an error status."""
    status = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    if response.status_code == 401:
        return (
            f"the Prefect API at {url} refused our credentials ({status}); set "
            "PREFECT_API_AUTH_STRING to the server's PREFECT_SERVER_API_AUTH_STRING "
            "(or PREFECT_API_KEY for Prefect Cloud)"
        )
    if response.status_code == 403:
        return (
            f"the Prefect API at {url} forbade the request ({status}: {response.text[:200]}); "
            "check PREFECT_API_AUTH_STRING (or PREFECT_API_KEY) and any proxy in front of it"
        )
    return f"the Prefect API at {url} answered {status}; check PREFECT_API_URL"


def start_temporary_server() -> str | None:
    """Start the embedded default's temporary server now, its process tied to ours, its
    stdout and stderr in `$PREFECT_HOME/logs/temporary-server.log`.

    With no PREFECT_API_URL, Prefect starts a temporary server on first use and stops it
    at interpreter exit; a `kill -9` (or a SIGTERM with no handler) skips that and the server
    stays behind. Started here, its pid goes to the reaper (a Job Object on Windows) as
    soon as it exists, so it ends with this process however this process ends. Prefect's
    client then finds the same server (one per process). It waits `STARTUP_TIMEOUT` seconds
    unless PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is set. Returns its URL, or None
    when nothing was started: a URL is configured, or Prefect's temporary server is not the
    shape `flows._prefect_compat.temporary_server` read (then Prefect starts its own on
    first use, as usual, only not tied to our process). Raises `ServerStartFailed` (one
    line, the log's path, its last lines) when the server does not come up.
    """
    if get_current_settings().api.url:
        return None
    server = compat.temporary_server()
    if server is None:
        return None
    path = Path(get_current_settings().home) / SERVER_LOG
    log = _open_server_log(path)
    startup = _Startup(server)
    if log is not None and not compat.send_server_output(server, log, startup.before_start):
        log.close()
        log = None
    try:
        failure = startup.run(startup_timeout())
        if failure is not None:
            raise ServerStartFailed(_failure_message(startup, failure, path, log))
    finally:
        if log is not None:
            log.close()  # the server has its own copy
    return server.api_url


def api_url_unset() -> bool:
    """No PREFECT_API_URL in this process's settings."""
    return not get_current_settings().api.url


def use_local_server(keep: float | None) -> local_server.ServerUse | None:
    """The embedded default's kept local server (`flows.ops.local_server`) for this command,
    with PREFECT_API_URL pointing at it from now on (this process's settings and
    environment, so processes it starts see it too); it leaves the server at exit.

    `keep` is the run's `local_server_idle`: > 0 finds or starts the server; 0 uses none (a
    temporary server, as before); None (a command that is not a run) uses one that is
    already up and starts none. None when a URL is configured or no server is used. Raises
    `ServerStartFailed` when a started server does not answer."""
    settings = get_current_settings()
    if settings.api.url or keep == 0 or not settings.server.ephemeral.enabled:
        return None
    home = Path(settings.home)
    try:
        if keep is None:
            use = local_server.reuse(home, prefect.__version__)
        else:
            use = local_server.join(home, keep, prefect.__version__, startup_timeout())
    except local_server_start.LocalServerFailed as exc:
        raise ServerStartFailed(_local_failure_message(exc)) from None
    if use is None:
        return None
    os.environ["PREFECT_API_URL"] = use.state.url
    # This home's own server, whatever its port: its slot ledgers are the embedded default's
    # (flows.slots.ledger_home.ledger_api), so a crash's slots are found after a restart.
    os.environ[LOCAL_SERVER_ENV] = use.state.url
    # For the rest of this command (the context manager must stay referenced: a generator
    # closed by the garbage collector would restore the settings). The flow's thread runs in
    # a copy of this context (flows.cli.run).
    pointed = temporary_settings(updates={PREFECT_API_URL: use.state.url})
    pointed.__enter__()
    atexit.register(_leave_server, use, pointed)
    return use


def watch_kept_server() -> Callable[[], str | None]:
    """For a command on the kept local server (`use_local_server`): a check that says what
    happened once the server is gone for good (its keeper ended: killed, or its server died
    and it ended with it; it is never restarted on that URL); None while it runs, and
    always on any other server."""
    url = os.environ.get(LOCAL_SERVER_ENV)
    state = local_server_files.read_state(Path(get_current_settings().home))
    if not url or state is None or state.url != url:
        return lambda: None
    kept = state

    def gone() -> str | None:
        if keeper_alive(kept):
            return None
        return (
            f"the local Prefect server at {url} stopped during the run (its keeper, pid "
            f"{kept.keeper_pid}, is gone), so nothing more of the run can be recorded"
        )

    return gone


def _local_failure_message(failure: local_server_start.LocalServerFailed) -> str:
    """One line naming what happened and the log, then the log's last lines (`log_tail`)."""
    try:
        with open(failure.log, "rb") as log:
            tail = log_tail(log)
    except OSError:
        tail = []
    return "\n".join([f"{failure}; its last lines:", *tail] if tail else [str(failure)])


def _leave_server(use: local_server.ServerUse, settings: AbstractContextManager[Any]) -> None:
    use.leave()
    settings.__exit__(None, None, None)


def startup_timeout() -> int:
    """How long to wait for the temporary server: the user's setting, else `STARTUP_TIMEOUT`."""
    ephemeral = get_current_settings().server.ephemeral
    if "startup_timeout_seconds" in ephemeral.model_fields_set:
        return ephemeral.startup_timeout_seconds
    return max(STARTUP_TIMEOUT, ephemeral.startup_timeout_seconds)


def _open_server_log(path: Path) -> IO[bytes] | None:
    """This run's server log, opened to append (the server writes, we read its tail); the
    previous run's moved to `<name>.1`. None when it can't be written: the server then
    writes to our terminal, as Prefect does."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, path.with_name(path.name + ".1"))
        except OSError:  # none yet, or another run's server holds it open (Windows): share it
            pass
        return path.open("a+b")
    except OSError:
        return None


class _Startup:
    """One start of the temporary server: its processes tied to ours as they appear, at
    most `MAX_STARTS` of them, and the end of the wait as soon as one has died for good."""

    def __init__(self, server: compat.TemporaryServer) -> None:
        self.server = server
        self.starts = 0
        self.gave_up = False
        self.timeout = 0
        self.tied: set[int] = set()

    def before_start(self) -> None:
        """Refuse a server process past `MAX_STARTS`, or once we stopped waiting."""
        if self.gave_up or self.starts >= MAX_STARTS:
            self.gave_up = True
            raise RuntimeError(f"the server process was started {self.starts} times")
        self.starts += 1

    def tie_new_process(self) -> None:
        from flows.process.trees import end_with_us

        process = self.server.server_process
        if process is not None and process.pid not in self.tied:
            end_with_us(process.pid)
            self.tied.add(process.pid)

    def exit_status(self) -> int | None:
        """The current server process's exit status, None while it runs (or none yet)."""
        process = self.server.server_process
        return None if process is None else process.poll()

    def run(self, timeout: int) -> BaseException | None:
        """Start the server and wait for it: None once it answers, else what went wrong."""
        self.timeout = timeout
        failure: list[BaseException] = []

        def start() -> None:
            try:
                self.server.start(timeout)
            except BaseException as exc:
                failure.append(exc)

        starter = threading.Thread(target=start, name="temporary-prefect-server", daemon=True)
        starter.start()
        while True:  # tie each server process to us as soon as it exists (it may restart)
            self.tie_new_process()
            if not starter.is_alive():
                break
            status = self.exit_status()
            if status is not None and status != 3:  # died, and Prefect won't restart it
                self.gave_up = True
                return RuntimeError(f"the server process exited with status {status}")
            starter.join(0.05)
        self.tie_new_process()  # a restart between the last look and the thread's end
        return failure[0] if failure else None


def _failure_message(
    startup: _Startup, failure: BaseException, path: Path, log: IO[bytes] | None
) -> str:
    """What to tell the user when the temporary server did not come up (one line, then the
    log's last lines when the server died)."""
    where = f"its log: {path}" if log is not None else "its log went to this terminal"
    process = startup.server.server_process
    alive = process is not None and process.poll() is None
    if alive and len(startup.tied) <= 1 and not startup.gave_up:  # up, but not answering
        longer = max(120, startup.timeout * 2)
        return (
            f"the temporary Prefect server did not answer within {startup.timeout} s; "
            f"to wait longer, set {_TIMEOUT_SETTING} (e.g. {longer}), or keep a "
            f"server running (`prefect server start`) and set PREFECT_API_URL; {where}"
        )
    status = startup.exit_status()
    if status is not None:
        what = f"exit status {status}"
    elif alive:  # an earlier process died (status 3), its restart did not answer in time
        what = f"restarted {len(startup.tied) - 1} times, then no answer in {startup.timeout} s"
    else:
        what = _one_line(failure)
    tail = log_tail(log) if log is not None else []
    lines = [f"the temporary Prefect server failed to start ({what}); {where}"]
    if tail:
        lines[0] += "; its last lines:"
        lines += tail
    return "\n".join(lines)


def _one_line(failure: BaseException) -> str:
    text = " ".join(str(failure).split())
    return f"{type(failure).__name__}: {text[:300]}" if text else type(failure).__name__


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CLOCK = re.compile(r"^\d\d:\d\d:\d\d(\.\d+)? \| ")  # Prefect's log line starts with the time
_NOT_SAYING = ("Traceback (most recent call last)", "The above exception", "During handling")


def log_tail(log: IO[bytes], lines: int = TAIL_LINES, window: int = 64 * 1024) -> list[str]:
    """The last `lines` lines of the server's log that say something: blank lines, traceback
    frames and headers left out (the exception lines stay), a line said again by a restart
    kept once (its last time), ANSI escapes stripped, each cut at 300 characters. Reads only
    the last `window` bytes."""
    try:
        log.seek(0, os.SEEK_END)
        size = log.tell()
        log.seek(max(0, size - window))
        text = log.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return []
    kept: dict[str, str] = {}  # the line without its time -> the line, in last-seen order
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        if not line.strip() or line[:1].isspace() or any(n in line for n in _NOT_SAYING):
            continue
        said = _CLOCK.sub("", line)
        kept.pop(said, None)
        kept[said] = line[:300]
    return list(kept.values())[-lines:]
