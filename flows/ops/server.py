"""Which Prefect API the CLI talks to, whether it answers, and the embedded default's
temporary server started early enough to end with us."""

from __future__ import annotations

import threading

import httpx
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import get_current_settings

from flows import _prefect_compat as compat


class ApiUnreachable(RuntimeError):
    """No Prefect API can be used; the message names the URL that was tried."""


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
    """Start the embedded default's temporary server now, its process tied to ours.

    With no PREFECT_API_URL, Prefect starts a temporary server on first use and stops it
    at interpreter exit; a `kill -9` (or a SIGTERM with no handler) skips that and the server
    stays behind. Started here, its pid goes to the reaper (a Job Object on Windows) as
    soon as it exists, so it ends with this process however this process ends. Prefect's
    client then finds the same server (one per process). Returns its URL, or None when
    nothing was started: a URL is configured, or Prefect's temporary server is not the shape
    `flows._prefect_compat.temporary_server` read (then Prefect starts its own on first use,
    as usual, only not tied to our process).
    """
    if get_current_settings().api.url:
        return None
    server = compat.temporary_server()
    if server is None:
        return None
    from flows.process.trees import end_with_us

    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:
            failure.append(exc)

    starter = threading.Thread(target=start, name="temporary-prefect-server", daemon=True)
    starter.start()
    tied: set[int] = set()

    def tie_new_process() -> None:
        process = server.server_process
        if process is not None and process.pid not in tied:
            end_with_us(process.pid)
            tied.add(process.pid)

    while True:  # tie each server process to us as soon as it exists (it may restart once)
        tie_new_process()
        if not starter.is_alive():
            break
        starter.join(0.05)
    if failure:
        raise failure[0]
    tie_new_process()  # a restart between the last look and the thread's end
    return server.api_url
