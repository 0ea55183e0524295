"""Group caps on a real Prefect server: `setup` creates each group's limit, `doctor`
reports it, and `open_slot_pool`'s group sites take a slot of both limits in one lease."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from uuid import uuid4

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.config import group_limit_name, load_plan
from flows.ops.checkup import doctor
from flows.ops.provision import setup
from flows.slots import SlotError
from flows.slots.prefect_api import PrefectSlotApi, ensure_limit
from flows.slots.prefect_pool import open_slot_pool
from tests.conftest import write_config


def test_setup_creates_each_group_limit_and_doctor_reports_it(
    tmp_path: Path, prefect_api: str
) -> None:
    """`setup` creates `<tag>:<group>` with the group's cap; `doctor` names it with its cap
    and slots in use, and says when it is missing."""
    config = write_config(
        tmp_path,
        ["a.example", "b.example"],
        max_concurrent_sites=3,
        groups={"host": {"max_concurrent": 1, "match": r"^a\."}},
    )
    plan = load_plan(config)
    name = group_limit_name(plan.config.concurrency_tag, "host")
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        lines, _ = doctor(plan)
        assert f"group limit {name!r}: missing (config: 1); `setup` or a run creates it" in lines
        changes = setup(plan)
        assert f"created concurrency limit {name!r} = 1" in changes
        assert f"concurrency limit {name!r} = 1 (unchanged)" in setup(plan)
        lines, _ = doctor(plan)
        assert f"group limit {name!r}: 1 (matches the config), 0 slot(s) in use" in lines


def test_one_lease_holds_both_limits_and_a_full_group_refuses_it_all(prefect_api: str) -> None:
    """On the real server, a lease on [global, group] takes a slot of each; with the group
    full a second is refused (None) and the global count is untouched; releasing the one
    lease frees both; an unknown group limit is a SlotError and leaves nothing held."""
    tag = f"grp-{uuid4().hex[:8]}"
    group = group_limit_name(tag, "host")
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        ensure_limit(client, tag, 3)
        ensure_limit(client, group, 1)
        api = PrefectSlotApi(client)
        lease = api.acquire([tag, group], 60)
        assert lease is not None
        assert client.read_global_concurrency_limit_by_name(tag).active_slots == 1
        assert client.read_global_concurrency_limit_by_name(group).active_slots == 1
        assert api.acquire([tag, group], 60) is None
        assert client.read_global_concurrency_limit_by_name(tag).active_slots == 1
        assert api.renew(lease, 60)
        api.release(lease)
        assert client.read_global_concurrency_limit_by_name(tag).active_slots == 0
        assert client.read_global_concurrency_limit_by_name(group).active_slots == 0
        try:
            api.acquire([tag, f"{tag}:nowhere"], 60)
        except SlotError as exc:
            assert f"'{tag}:nowhere' does not exist" in str(exc)
        else:
            raise AssertionError("an unknown group limit was leased")
        assert client.read_global_concurrency_limit_by_name(tag).active_slots == 0


def test_a_real_pool_runs_other_sites_while_group_sites_take_turns(prefect_api: str) -> None:
    """`open_slot_pool` on a real server, group cap 1, global cap 2, two group sites listed
    first: the other site runs while the group sites take turns, never more than one group
    site nor two in all."""
    tag = f"grp-{uuid4().hex[:8]}"
    sites = ["g1", "g2", "o1"]
    running: set[str] = set()
    spans: dict[str, tuple[float, float]] = {}
    peaks = [0, 0]
    lock = threading.Lock()
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        ensure_limit(client, tag, 2)
        ensure_limit(client, group_limit_name(tag, "host"), 1)
        pool = open_slot_pool(
            tag,
            sites,
            holder_id=uuid4(),
            prefetch=2,
            groups={"g1": "host", "g2": "host"},
            group_limits={"host": 1},
        )
        try:

            def body(site: str) -> None:
                with pool.slot(site):
                    with lock:
                        start = time.monotonic()
                        running.add(site)
                        peaks[0] = max(peaks[0], len(running))
                        peaks[1] = max(peaks[1], len(running & {"g1", "g2"}))
                    time.sleep(1.0 if site.startswith("g") else 0.3)
                    with lock:
                        running.discard(site)
                        spans[site] = (start, time.monotonic())
                pool.site_finished(site)

            threads = [threading.Thread(target=body, args=(site,)) for site in sites]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        finally:
            pool.close()
        assert set(spans) == set(sites)
        assert peaks == [2, 1]
        assert spans["o1"][1] < spans["g2"][0], spans
        assert client.read_global_concurrency_limit_by_name(tag).active_slots == 0
