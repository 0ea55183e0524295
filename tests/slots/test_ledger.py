"""The lease ledger: what a crashed run still held can be found and given back."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from flows.slots import SlotPool, ledger
from tests.support.fakes.slot_api import FakeLimit, FakeSlotApi
from tests.support.processes import dead_labels
from tests.support.waiting import wait_for


def held_leases(path: Path) -> dict[UUID, tuple[str, ...]] | None:
    found = ledger.read(path)
    return None if found is None else dict(found.leases)


def write_dead_ledger(folder: Path, api: str, lines: list[dict[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid4()}-1.jsonl"
    header = {"holder": "run-1", "api": api, "labels": dead_labels()}
    path.write_text("".join(json.dumps(x) + "\n" for x in [header, *lines]) + '{"+": "cut')
    return path


def test_a_pool_notes_each_lease_and_removes_its_file_when_all_went_back(tmp_path: Path) -> None:
    """Each lease the pool takes is noted, each it gives back is struck off; closing the
    pool (every lease back) removes the file."""
    book = ledger.Ledger(tmp_path, "run-1", "api-x")
    limit = FakeLimit(2)
    pool = SlotPool("cap", ["a", "b"], FakeSlotApi(limit), park=False, ledger=book)
    try:
        with pool.slot("a"):
            held = ledger.read(book.path)
            assert held is not None and list(held.leases.values()) == [("cap",)]
            assert set(held.leases) == limit.leases
        pool.site_finished("a")
        # The release happens on the pool's releaser thread.
        assert wait_for(lambda: held_leases(book.path) == {})
    finally:
        pool.close()
    assert not book.path.exists()


def test_orphans_are_ledgers_of_dead_processes_for_this_api_only(tmp_path: Path) -> None:
    """A dead process's ledger for this API is an orphan, with the leases it still held (a
    line cut short by the crash is ignored); a live process's ledger, or another API's,
    is not."""
    kept, freed = uuid4(), uuid4()
    dead = write_dead_ledger(
        tmp_path,
        "api-x",
        [{"+": str(kept), "name": "cap"}, {"+": str(freed), "name": "cap"}, {"-": str(freed)}],
    )
    write_dead_ledger(tmp_path, "api-y", [{"+": str(uuid4()), "name": "cap"}])
    live = ledger.Ledger(tmp_path, "run-2", "api-x")
    live.held(uuid4(), ["cap"])
    found = list(ledger.orphans(tmp_path, "api-x"))
    assert [o.path for o in found] == [dead]
    assert found[0].leases == {kept: ("cap",)} and found[0].holder == "run-1"
    live.close()


def test_a_file_that_is_not_a_ledger_is_ignored(tmp_path: Path) -> None:
    """Garbage in the folder is skipped, not an error."""
    (tmp_path / "junk.jsonl").write_text("not json\n")
    (tmp_path / "empty.jsonl").write_text("")
    assert list(ledger.orphans(tmp_path, "api-x")) == []
    assert list(ledger.orphans(tmp_path / "missing", "api-x")) == []


def test_reclaim_releases_a_dead_runs_lease_on_a_real_server(
    tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a URL's server (no lease expiry service here: prefect_test_harness), a lease a dead
    process still held is released by `reclaim`, the limit's slot comes back, and the ledger
    goes; `dry_run` only says what it would do."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.slots import ledger_home
    from flows.slots import prefect_api as prefect_slots
    from flows.slots.reclaim import reclaim

    monkeypatch.setattr(ledger_home, "ledger_folder", lambda: tmp_path)
    name = f"reclaim-{uuid4().hex[:8]}"
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        prefect_slots.ensure_limit(client, name, 1)
        lease = prefect_slots.PrefectSlotApi(client).acquire([name], 60)
        assert lease is not None
        path = write_dead_ledger(
            tmp_path, ledger_home.ledger_api(), [{"+": str(lease), "name": name}]
        )
        pid = json.loads(path.read_text().splitlines()[0])["labels"]["site-pipeline.pid"]
        assert reclaim(client, dry_run=True) == [
            f"would give back 1 of 1 slot(s) held by flow run run-1, whose process ({pid}) is gone"
        ]
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 1
        lines = reclaim(client)
        assert len(lines) == 1 and lines[0].startswith("gave back 1 of 1 slot(s)")
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0
        assert not path.exists()
        assert reclaim(client) == []  # nothing twice
