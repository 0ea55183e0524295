"""Which Prefect API the CLI talks to, whether it answers, and, with no PREFECT_API_URL, the
embedded default's local server this command uses (`flows.ops.local_server`: found, or
started for it through a keeper, its own log in `logs/local-server.log` under PREFECT_HOME,
never in the user's terminal)."""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

import httpx
import prefect
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from flows.ops import local_server, local_server_files, local_server_start
from flows.ops.local_server_checks import keeper_alive
from flows.slots.ledger_home import LOCAL_SERVER_ENV

STARTUP_TIMEOUT = 60
"""Seconds to wait for the local server when PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
is not set: Prefect's own 20 s ran out on one run in ten on a loaded 2-core machine."""
TAIL_LINES = 8
_TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


class ApiUnreachable(RuntimeError):
    """No Prefect API can be used; the message names the URL that was tried."""


class ServerStartFailed(ApiUnreachable):
    """The local server did not come up: the first line says what happened, with the log's
    path; any further lines are the last lines of that log."""


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


def api_url_unset() -> bool:
    """No PREFECT_API_URL in this process's settings."""
    return not get_current_settings().api.url


def use_local_server(keep: float | None) -> local_server.ServerUse | None:
    """The embedded default's local server (`flows.ops.local_server`) for this command, with
    PREFECT_API_URL pointing at it from now on (this process's settings and environment, so
    processes it starts see it too); it leaves the server at exit.

    `keep` is the run's `local_server_idle`: > 0 finds or starts the server and keeps it that
    long after the last run on it ends; 0 (a run that keeps nothing) or None (a command that
    is not a run) uses one that is up as it is, or starts one that stops as soon as the last
    command on it ends (its keeper sees this process gone, however it ended). None when a
    URL is configured or the embedded server is disabled. Raises `ServerStartFailed` when a
    started server does not answer."""
    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    home = Path(settings.home)
    idle = keep if keep else local_server.NO_SAY
    try:
        use = local_server.join(home, idle, prefect.__version__, startup_timeout())
    except local_server_start.LocalServerFailed as exc:
        raise ServerStartFailed(_local_failure_message(exc)) from None
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
    """One line naming what happened and the log (and, when the server did not answer in
    time, the setting that waits longer), then the log's last lines (`log_tail`)."""
    first = str(failure)
    if failure.what.startswith("did not answer"):
        longer = max(120, startup_timeout() * 2)
        first += f"; to wait longer, set {_TIMEOUT_SETTING} (e.g. {longer})"
    try:
        with open(failure.log, "rb") as log:
            tail = log_tail(log)
    except OSError:
        tail = []
    return "\n".join([f"{first}; its last lines:", *tail] if tail else [first])


def _leave_server(use: local_server.ServerUse, settings: AbstractContextManager[Any]) -> None:
    use.leave()
    settings.__exit__(None, None, None)


def startup_timeout() -> int:
    """How long to wait for the local server: the user's setting, else `STARTUP_TIMEOUT`."""
    ephemeral = get_current_settings().server.ephemeral
    if "startup_timeout_seconds" in ephemeral.model_fields_set:
        return ephemeral.startup_timeout_seconds
    return max(STARTUP_TIMEOUT, ephemeral.startup_timeout_seconds)


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
