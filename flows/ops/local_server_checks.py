"""Whether the kept local server that `local-server.json` records can be used: its keeper
still runs, it answers healthy, it is of this Prefect version and its UI calls its own
address (`verdict`); and whether a process tree listens on a port (`listens_on`).
"""

from __future__ import annotations

from typing import Literal

import httpx
import psutil

from flows.ops.local_server_files import ServerState, ui_url_of
from flows.process.holders import same_process

CHECK_TIMEOUT = 5.0
"""Seconds a health or version request to a recorded server may take."""

Verdict = Literal["ok", "dead", "foreign", "other-version", "no-answer", "wrong-ui"]


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
