"""Where this host's slot ledgers are (`ledger_folder`), and which server they name (`ledger_api`).

The embedded default's server (a temporary one, or the kept local server) restarts on
another port each time, so its ledgers name its database, not its URL. Callers use these
through the module (`ledger_home.ledger_folder()`), so a test can point them elsewhere.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.settings import get_current_settings


def ledger_folder() -> Path:
    """Where this host's slot pools list their leases (`flows.slots.ledger`)."""
    return Path(get_current_settings().home) / "site-pipeline" / "leases"


LOCAL_SERVER_ENV = "SITE_PIPELINE_LOCAL_SERVER"
"""The kept local server's URL, set by `flows.ops.server.use_local_server` for the command
and what it starts: that server is the embedded default's (this PREFECT_HOME's database),
whatever port it listens on this time."""


def ledger_api() -> str:
    """Which server a ledger's leases belong to: its URL, or for the embedded default (a
    temporary server, or the kept local server, each restart on another port) its database."""
    settings = get_current_settings()
    url = str(settings.api.url or "").rstrip("/")
    if url and url != os.environ.get(LOCAL_SERVER_ENV, "").rstrip("/"):
        return url
    database = settings.server.database.connection_url
    where = database.get_secret_value() if database else str(settings.home)
    # A digest: the database URL may hold a password, and this goes into a file.
    return f"embedded {hashlib.sha256(where.encode()).hexdigest()[:16]}"


def on_embedded_default() -> bool:
    """The API is this PREFECT_HOME's own server, which listens on loopback only: every
    process that can hold its slots runs on this host and notes them in `ledger_folder()`."""
    return ledger_api().startswith("embedded ")


def serves_this_home(client: SyncPrefectClient) -> bool:
    """The server says (`GET /admin/settings`) it runs for this PREFECT_HOME: the check that
    a URL taken for the embedded default's really is this home's server (not another
    home's, which took the port a moment before). False when it can't tell."""
    try:
        response = client.request("GET", "/admin/settings")
        response.raise_for_status()
        home = Path(str(response.json()["home"]))
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False
    return home.resolve() == Path(get_current_settings().home).resolve()
