"""Every use of a private Prefect or Dask name, fenced in one module. Read from Prefect
3.9.1 (`READ_FROM`).

Each use has a reason, a fallback that stays correct (slower or less tidy, never wrong),
and a test in `tests/test_prefect_compat.py` that fails when the name is gone or changes
shape, so an upgrade shows up in CI and not in a nightly run.

1. `SyncPrefectClient._client._send_with_retry(...)`: send one request through the
   client's own request path (its connection, auth header, CSRF token and custom
   headers), with no retry codes. Why: on a retryable status (503, which SQLite answers
   whenever it is busy) `PrefectHttpxSyncClient.send` sleeps `2 ** n` seconds (about 2 s)
   before it even checks whether retries are left, so `PREFECT_CLIENT_MAX_RETRIES=0` does
   not avoid the sleep, and the slot broker polls every 50 ms itself.
   Fallback: `SyncPrefectClient.request(...)`, the public path, with its retry sleeps.

2. `prefect.concurrency.services._no_limits_cache` and `_cache_lock`: the task engine's
   5-second cache of "these tags have no `tag:` concurrency limit". Why: every tagged
   task run checks that through one serialized queue per process; on SQLite a refresh can
   get a 503 and the 2 s sleep above, stalling every task run behind it. We keep the entry
   fresh only while a read through the API confirms no such limit exists.
   Fallback: do nothing; Prefect checks as usual.

3. (None now: the embedded default's server that a run with `local_server_idle: 0` (or any
   other command) starts, once Prefect's `SubprocessASGIServer` started early and tied to
   our process, is the kept local server with no idle time, `flows.ops.local_server`: its
   keeper stops it as soon as the last command on it ends, a `kill -9`ed one included.
   Measured side by side, `bench/zero_idle.py` in BENCHMARKS.md.)

4. (None now: Dask's default worker count, once read from its private
   `nprocesses_nthreads`, is Dask's rule restated on its public `dask.system.CPU_COUNT`,
   `flows.dask_cluster.default_workers`; the same answer, checked against Dask's function
   in `tests/test_dask_cluster.py`.)

5. `SyncClientContext.__var__` (the context variable behind `SyncClientContext.get()`) and
   its private `_httpx_settings` (which `get_client(sync_client=True)` compares with its
   own argument before it reuses a context's client). Why: a task run on a Dask worker
   makes two new sync clients (`hydrated_context` and the task engine's
   `SyncClientContext.get_or_create()`), about 22 ms of CPU each with their TLS context:
   a third of a short site's cost on a worker. `shared_sync_client` makes one client the
   current context's in this thread without entering or closing it (the client's own
   enter count is not thread-safe), as Prefect's thread runner shares the flow's one
   client with every task thread. Fallback: nothing is shared; each task run makes its
   own clients, as Prefect does.

(`prefect.logging.handlers.PrefectConsoleHandler`, which the CLI's console replaces, is
public: it is in Prefect's API reference and named in its default `logging.yml`.)
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Prefect is imported where used
    import httpx
    from prefect.client.orchestration import SyncPrefectClient

READ_FROM = "3.9.1"
_SEND_PARAMS = ("request", "send", "send_args", "send_kwargs", "retry_codes", "retry_exceptions")


def _send_once_fn(client: SyncPrefectClient) -> Any | None:
    """The client's `_send_with_retry` bound to its httpx client, or None if it changed."""
    import httpx

    http = getattr(client, "_client", None)
    send_with_retry = getattr(http, "_send_with_retry", None)
    if not isinstance(http, httpx.Client) or not callable(send_with_retry):
        return None
    try:
        params = tuple(inspect.signature(send_with_retry).parameters)
    except (TypeError, ValueError):
        return None
    if params != _SEND_PARAMS:
        return None
    return partial(
        send_with_retry,
        send=partial(httpx.Client.send, http),
        send_args=(),
        send_kwargs={},
        retry_codes=set(),
        retry_exceptions=(),
    )


def fast_path_available(client: SyncPrefectClient) -> bool:
    """True when `post_once` can skip the client's retry sleep (use 1 above)."""
    return _send_once_fn(client) is not None


def post_once(
    client: SyncPrefectClient, path: str, body: dict[str, Any], *, fast: bool = True
) -> httpx.Response:
    """POST `body` to `path` through the Prefect client; any status comes back as a response.

    Raises `httpx.TransportError` when the server can't be reached.
    """
    send_once = _send_once_fn(client) if fast else None
    if send_once is not None:
        http: httpx.Client = client._client  # checked by _send_once_fn
        response: httpx.Response = send_once(http.build_request("POST", path, json=body))
        return response
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        return client.request("POST", path, json=body)  # type: ignore[arg-type]
    except PrefectHTTPStatusError as exc:
        return exc.response


def _no_limits_cache() -> tuple[MutableMapping[frozenset[str], bool], Any] | None:
    """Prefect's "no tag limits" cache and its lock, or None if they changed (use 2 above)."""
    try:
        from prefect.concurrency import services
    except ImportError:
        return None
    cache = getattr(services, "_no_limits_cache", None)
    lock = getattr(services, "_cache_lock", None)
    if not isinstance(cache, MutableMapping) or not hasattr(lock, "__enter__"):
        return None
    return cache, lock


def tag_cache_available() -> bool:
    """True when `mark_no_tag_limits` can spare Prefect its per-task-run check."""
    return _no_limits_cache() is not None


def mark_no_tag_limits(tag_limit_names: Iterable[str]) -> bool:
    """Tell the task engine that these `tag:<tag>` limits don't exist. False = not done."""
    found = _no_limits_cache()
    if found is None:
        return False
    cache, lock = found
    with lock if lock is not None else threading.Lock():
        cache[frozenset(tag_limit_names)] = True
    return True


def _sync_client_var() -> ContextVar[Any] | None:
    """The context variable `SyncClientContext.get()` reads (use 5), or None if it changed."""
    from prefect.context import SyncClientContext

    found = getattr(SyncClientContext, "__var__", None)
    return found if isinstance(found, ContextVar) else None


@contextmanager
def shared_sync_client(client: SyncPrefectClient) -> Iterator[bool]:
    """In this thread, `client` is the current sync client (use 5): Prefect's
    `get_client(sync_client=True)` and `SyncClientContext.get_or_create()` return it. It is
    neither entered nor closed here: its owner does that. Yields whether it is shared
    (False: the fallback, Prefect makes its own clients)."""
    from prefect.context import SyncClientContext

    var = _sync_client_var()
    try:
        context = SyncClientContext.model_construct(client=client) if var else None
    except (TypeError, ValueError):  # its fields changed
        context = None
    if var is None or context is None or getattr(context, "_httpx_settings", 0) is not None:
        yield False
        return
    token = var.set(context)
    try:
        yield True
    finally:
        var.reset(token)
