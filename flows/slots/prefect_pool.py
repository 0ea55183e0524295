"""A `SlotPool` on the current Prefect API: its client, its ledger and canary, its group limits.

`open_slot_pool` is how a flow run (or a Dask worker) gets its pool; `TagCheckShortcut`
spares the task engine its tag-limit check while the pool is open.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.exceptions import ObjectNotFound

from flows import _prefect_compat as compat
from flows.config import group_limit_name
from flows.slots import ledger_home
from flows.slots.ledger import Ledger
from flows.slots.pool import SlotPool
from flows.slots.pool_state import PoolSettings
from flows.slots.prefect_api import Canary, PrefectSlotApi
from flows.slots.slot_holders import holders_line


class TagCheckShortcut:
    """Spare the task engine its per-task-run tag-limit check while no tag limit exists.

    Every task run with tags asks the server for slots of `tag:<tag>` limits. With no such
    limit the answer is cached for only 5 s; on SQLite the refresh can get a 503 and the
    client's ~2 s retry sleep, stalling every task run behind it. Only while a read (which
    SQLite never refuses) says no `tag:<tag>` limit exists for any of `tags`, this keeps
    that cache entry fresh (`flows._prefect_compat`, use 2). If someone creates such a
    limit, the next check (every `recheck` seconds) stops the shortcut and Prefect enforces
    the limit as usual.
    """

    def __init__(self, client: SyncPrefectClient, tags: Sequence[str], recheck: float = 10.0):
        self._client = client
        self._names = frozenset(f"tag:{tag}" for tag in tags)
        self._recheck = recheck
        self._checked_at = -recheck
        self._active = False

    def refresh(self) -> None:
        """Call every second or so."""
        if not self._names or not compat.tag_cache_available():
            return
        now = time.monotonic()
        if now - self._checked_at >= self._recheck:
            self._checked_at = now
            active = True
            for name in self._names:
                try:
                    self._client.read_global_concurrency_limit_by_name(name)
                    active = False  # a tag limit exists: Prefect must enforce it
                except ObjectNotFound:
                    pass
                except Exception:  # can't tell: leave Prefect to it
                    active = False
            self._active = active
        if self._active:
            compat.mark_no_tag_limits(self._names)


def site_limit_names(name: str, groups: Mapping[str, str]) -> dict[str, str]:
    """Each site of `groups` (site -> group): its group's limit name under the limit `name`,
    as a `SlotPool`'s `site_groups` takes it."""
    return {site: group_limit_name(name, group) for site, group in groups.items()}


def open_slot_pool(
    name: str,
    sites: Sequence[str],
    *,
    holder_id: UUID | None,
    prefetch: int = 0,
    patience: float = 2.0,
    park: bool = True,
    api_patience: float = 300.0,
    wait_notice: float = 60.0,
    tags: Sequence[str] = (),
    groups: Mapping[str, str] | None = None,
    group_limits: Mapping[str, int] | None = None,
) -> SlotPool:
    """A `SlotPool` on the current Prefect API, with a client of its own that `close()`
    closes after giving every lease back.

    `groups` maps a site to its group (`RunPlan.group_of`), `group_limits` a group to its
    cap (`RunPlan.group_limits`): a group's sites take a slot of its limit
    (`group_limit_name(name, group)`) and of `name` in one call."""
    client = get_client(sync_client=True)
    client.__enter__()
    try:
        shortcut = TagCheckShortcut(client, tags)
        shortcut.refresh()
        slots = PrefectSlotApi(client, holder_id)
        book = Ledger(ledger_home.ledger_folder(), str(holder_id), ledger_home.ledger_api())
        canary = Canary(slots, book)

        def tick() -> None:
            shortcut.refresh()
            canary.tick()

        def close() -> None:
            canary.close()
            client.__exit__(None, None, None)

        return SlotPool(
            name,
            sites,
            slots,
            PoolSettings(patience=patience, api_patience=api_patience, wait_notice=wait_notice),
            prefetch=prefetch,
            park=park,
            on_tick=tick,
            on_close=close,
            ledger=book,
            site_groups=site_limit_names(name, groups or {}),
            group_caps={group_limit_name(name, g): cap for g, cap in (group_limits or {}).items()},
            explain_wait=lambda: holders_line(client, name, holder_id),
        )
    except BaseException:
        client.__exit__(None, None, None)
        raise
