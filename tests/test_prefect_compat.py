"""The private Prefect names in `flows._prefect_compat`: present and of the shape we read,
with working fallbacks. When Prefect changes, these fail in CI, not at night."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterator
from uuid import uuid4

import httpx
import prefect
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client

from flows import _prefect_compat as compat
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def client() -> Iterator[SyncPrefectClient]:
    with get_client(sync_client=True) as sync_client:
        yield sync_client


def test_the_installed_prefect_is_the_minor_version_the_fence_was_read_from() -> None:
    """pyproject pins Prefect to the minor version compat.READ_FROM names; moving the pin
    means re-reading the fenced names (README, Server settings)."""
    major, minor, _ = compat.READ_FROM.split(".")
    assert prefect.__version__.startswith(f"{major}.{minor}."), prefect.__version__
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"prefect>={compat.READ_FROM},<{major}.{int(minor) + 1}" in deps


def test_the_client_still_has_the_one_try_request_path(client: SyncPrefectClient) -> None:
    """Use 1: `SyncPrefectClient._client._send_with_retry` exists with the parameters read."""
    assert compat.fast_path_available(client)


def test_the_tag_limit_cache_is_still_there_and_writable() -> None:
    """Use 2: `_no_limits_cache` is a mapping with a lock, and a mark lands in it."""
    from prefect.concurrency import services

    assert compat.tag_cache_available()
    names = frozenset({f"tag:compat-{uuid4().hex[:8]}"})
    assert compat.mark_no_tag_limits(names)
    assert services._no_limits_cache.get(names) is True


@pytest.mark.parametrize("fast", [True, False])
def test_post_once_returns_every_status_as_a_response(
    client: SyncPrefectClient, fast: bool
) -> None:
    """Fast path and public fallback alike: a full limit comes back as a 423 response and a
    free one as 200 with a lease, never as an exception."""
    name = f"compat-{uuid4().hex[:8]}"
    client.upsert_global_concurrency_limit_by_name(name, 1)
    body = {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": 60}
    path = "/v2/concurrency_limits/increment-with-lease"

    def answered(path: str, body: dict[str, object]) -> httpx.Response:
        """`post_once`'s response once the server is not busy: SQLite under a loaded CI
        machine answers 503 now and then (a CI run got one for the 423), and `post_once`
        returns that too, as it must; its callers wait it out, so this test does."""
        deadline = time.monotonic() + 30
        while True:
            response = compat.post_once(client, path, body, fast=fast)
            if response.status_code != 503 or time.monotonic() > deadline:
                return response
            time.sleep(0.2)

    first = answered(path, body)
    assert first.status_code == 200 and first.json()["lease_id"]
    second = answered(path, body)
    assert second.status_code == 423
    released = answered(
        "/v2/concurrency_limits/decrement-with-lease", {"lease_id": first.json()["lease_id"]}
    )
    assert released.status_code == 204
    assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


def test_a_changed_client_falls_back_to_the_public_path(client: SyncPrefectClient) -> None:
    """If `_send_with_retry` changes shape, `post_once` still works through `client.request`."""
    http = client._client
    original = http._send_with_retry
    http._send_with_retry = lambda request, **kwargs: original(request, **kwargs)  # type: ignore[method-assign]
    try:
        assert not compat.fast_path_available(client)
        response = compat.post_once(
            client, "/v2/concurrency_limits/decrement-with-lease", {"lease_id": str(uuid4())}
        )
        assert response.status_code == 204
    finally:
        del http._send_with_retry


def test_a_shared_sync_client_is_the_one_prefect_s_task_engine_gets(
    client: SyncPrefectClient,
) -> None:
    """Use 5: inside `shared_sync_client(c)`, `get_client(sync_client=True)` and
    `SyncClientContext.get_or_create()` (the two the task engine makes a client with) give
    `c`, and leaving it neither closes `c` nor leaves it current."""
    from prefect.context import SyncClientContext

    with compat.shared_sync_client(client) as shared:
        assert shared
        assert get_client(sync_client=True) is client
        with SyncClientContext.get_or_create() as context:
            assert context.client is client
    assert get_client(sync_client=True) is not client
    assert client.api_healthcheck() is None  # still open


def test_without_the_context_variable_no_client_is_shared(
    client: SyncPrefectClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Use 5's fallback: with `SyncClientContext.__var__` gone, nothing is shared and
    Prefect makes its own client."""
    from prefect.context import SyncClientContext

    monkeypatch.setattr(SyncClientContext, "__var__", None)
    with compat.shared_sync_client(client) as shared:
        assert not shared
