"""The night after a crash (issue 43): no slot outlives its holder, and every wait for a slot
can be stopped and says why it waits.

Against the session's real Prefect API (`prefect_api`): a dead run's lease ledger is written
as the pool writes it, the server's counts are set through its own endpoints, and `reclaim`
must give back exactly the slots no live process holds.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from flows.process.holders import HOST_LABEL, holder_labels, this_process_labels
from flows.slots import PoolSettings, SlotPool, WaitStopped, ledger
from tests.support.fakes.slot_api import FakeLimit, FakeSlotApi
from tests.support.processes import dead_labels
from tests.support.waiting import wait_for


@pytest.fixture()
def api(prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A client of the session's API, the ledgers in `tmp_path/leases`, a fresh limit."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.slots import ledger_home

    monkeypatch.setattr(ledger_home, "ledger_folder", lambda: tmp_path / "leases")
    monkeypatch.delenv(ledger_home.LOCAL_SERVER_ENV, raising=False)
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        yield client


def new_limit(client: object, cap: int) -> str:
    from flows.slots.prefect_api import ensure_limit

    name = f"crash-{uuid4().hex[:8]}"
    ensure_limit(client, name, cap)  # type: ignore[arg-type]
    return name


def in_use(client: object, name: str) -> int:
    return int(client.read_global_concurrency_limit_by_name(name).active_slots)  # type: ignore[attr-defined]


def count_without_lease(client: object, name: str, slots: int) -> None:
    """What a server restart with leases in memory leaves: slots counted, no lease."""
    response = client.request(  # type: ignore[attr-defined]
        "POST",
        "/v2/concurrency_limits/increment",
        json={"names": [name], "slots": slots, "mode": "concurrency"},
    )
    response.raise_for_status()


def write_ledger(
    folder: Path, api: str, labels: dict[str, str], entries: list[dict[str, object]]
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid4()}-1.jsonl"
    header = {"holder": str(uuid4()), "api": api, "labels": labels}
    path.write_text("".join(json.dumps(x) + "\n" for x in [header, *entries]))
    return path


def other_host_labels() -> dict[str, str]:
    return {**holder_labels(1, 0.0), HOST_LABEL: "night-runner-2"}


def test_a_canary_lease_holds_no_slot_and_the_server_knows_it_until_released(api: object) -> None:
    """The canary (a lease on a limit that never exists) takes no slot of any limit, and the
    server knows it until it is released. Prefect 3.9 skips a name it does not know; if that
    changes, the restart rule loses its witness and this test goes red."""
    from flows.slots.prefect_api import PrefectSlotApi

    name = new_limit(api, 1)
    slots = PrefectSlotApi(api)  # type: ignore[arg-type]
    canary = slots.canary()
    assert canary is not None
    assert in_use(api, name) == 0
    assert slots.renew(canary, 60.0)
    slots.release(canary)
    assert not slots.renew(canary, 60.0)


def test_a_dead_run_s_slot_that_a_restart_lost_is_given_back(api: object, tmp_path: Path) -> None:
    """A dead pool's lease the server no longer knows, with its canary gone too (a restart of
    a server that keeps leases in memory: the slot still counts), is given back by name."""
    from flows.slots.ledger_home import ledger_api
    from flows.slots.reclaim import reclaim

    name = new_limit(api, 2)
    count_without_lease(api, name, 1)
    lost = uuid4()
    path = write_ledger(
        tmp_path / "leases",
        ledger_api(),
        dead_labels(),
        [{"canary": str(uuid4())}, {"+": str(lost), "names": [name]}],
    )
    lines = reclaim(api)  # type: ignore[arg-type]
    assert len(lines) == 1 and lines[0].startswith("gave back 1 of 1 slot(s)"), lines
    assert in_use(api, name) == 0
    assert not path.exists()


def test_a_dead_run_s_expired_lease_is_left_alone_and_another_host_s_slot_stays(
    api: object, tmp_path: Path
) -> None:
    """A dead pool's lease the server no longer knows while its canary is still known expired
    (the server gave its slot back already): nothing is given back twice, so the slot a
    live run of another host holds stays taken. A ledger of another host is never an orphan."""
    from flows.slots.ledger_home import ledger_api
    from flows.slots.prefect_api import PrefectSlotApi
    from flows.slots.reclaim import reclaim

    name = new_limit(api, 2)
    count_without_lease(api, name, 1)  # the other host's run holds it
    write_ledger(
        tmp_path / "leases",
        ledger_api(),
        other_host_labels(),
        [{"+": str(uuid4()), "names": [name]}],
    )
    canary = PrefectSlotApi(api).canary()  # type: ignore[arg-type]
    dead = write_ledger(
        tmp_path / "leases",
        ledger_api(),
        dead_labels(),
        [{"canary": str(canary)}, {"+": str(uuid4()), "names": [name]}],
    )
    lines = reclaim(api)  # type: ignore[arg-type]
    assert len(lines) == 1 and "lease expiry gave the rest back" in lines[0], lines
    assert lines[0].startswith("gave back 0 of 1 slot(s)")
    assert in_use(api, name) == 1
    assert not dead.exists()


def test_on_the_embedded_default_slots_no_live_process_holds_go_back_and_no_others(
    api: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On this home's own server, the slots in use beyond what live pools hold or are asking
    for go back (a ledger of an older version, keyed by the old server's port, explains
    nothing); a live pool's slot, an ask in flight and another host's slot stay."""
    from flows.slots import ledger_home
    from flows.slots.reclaim import reclaim

    monkeypatch.setenv(ledger_home.LOCAL_SERVER_ENV, str(api.api_url))  # type: ignore[attr-defined]
    assert ledger_home.on_embedded_default()
    name = new_limit(api, 5)
    count_without_lease(api, name, 5)
    folder, key = tmp_path / "leases", ledger_home.ledger_api()
    write_ledger(folder, key, this_process_labels(), [{"+": str(uuid4()), "names": [name]}])
    asking = write_ledger(folder, key, this_process_labels(), [])
    ledger.ask_path(asking).write_text(json.dumps([name]))  # an acquire in flight
    write_ledger(folder, key, other_host_labels(), [{"+": str(uuid4()), "names": [name]}])
    old = "http://127.0.0.1:41234/api"  # the kept server's port before its restart
    write_ledger(folder, old, dead_labels(), [{"+": str(uuid4()), "names": [name]}])
    assert reclaim(api, dry_run=True, names=[name]) == [  # type: ignore[arg-type]
        f"would give back 2 slot(s) of {name!r} that no live process holds "
        "(the server counted 5 in use, live runs here hold 3)"
    ]
    assert in_use(api, name) == 5
    reclaim(api, names=[name])  # type: ignore[arg-type]
    assert in_use(api, name) == 3
    assert reclaim(api, names=[name]) == []  # type: ignore[arg-type]


def test_the_kept_server_s_ledgers_are_the_embedded_default_s_whatever_its_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run on the kept local server keys its ledger by this home's database, so the run
    after a restart on another port finds it; a URL the user set is keyed by itself."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.slots import ledger_home

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings({PREFECT_API_URL: None}):
        embedded = ledger_home.ledger_api()
    assert embedded.startswith("embedded ")
    for port in (41234, 41999):
        url = f"http://127.0.0.1:{port}/api"
        monkeypatch.setenv(ledger_home.LOCAL_SERVER_ENV, url)
        with temporary_settings({PREFECT_API_URL: url}):
            assert ledger_home.ledger_api() == embedded
    with temporary_settings({PREFECT_API_URL: "http://prefect.example:4200/api"}):
        assert ledger_home.ledger_api() == "http://prefect.example:4200/api"


def test_a_pool_notes_an_ask_before_it_goes_out_and_closes_it_after(tmp_path: Path) -> None:
    """While an acquire is in flight the ledger counts its slot as held (a crash cleanup
    must not take it); a refused ask is closed, a granted one becomes its lease."""
    book = ledger.Ledger(tmp_path, "run-1", "api-x")
    limit = FakeLimit(1)
    seen: list[tuple[str, ...]] = []
    api = FakeSlotApi(limit)
    acquire = api.acquire

    def watched(names: list[str], lease_seconds: float) -> UUID | None:
        found = ledger.read(book.path)
        assert found is not None
        seen.append(found.asking)
        return acquire(names, lease_seconds)

    api.acquire = watched  # type: ignore[method-assign]
    pool = SlotPool("cap", ["a"], api, park=False, ledger=book)
    try:
        with pool.slot("a"):
            found = ledger.read(book.path)
            assert found is not None and found.asking == () and len(found.leases) == 1
    finally:
        pool.close()
    assert seen and seen[0] == ("cap",)


def test_stop_waits_ends_every_wait_for_a_slot_at_once() -> None:
    """A site waiting for a slot held elsewhere raises WaitStopped as soon as the run stops,
    and so does a site that asks after."""
    limit = FakeLimit(1)
    holder = SlotPool("cap", ["x"], FakeSlotApi(limit), park=False)
    pool = SlotPool("cap", ["a", "b"], FakeSlotApi(limit), park=False)
    ended: list[BaseException] = []

    def wait() -> None:
        try:
            with pool.slot("a"):
                pass
        except BaseException as exc:
            ended.append(exc)

    try:
        with holder.slot("x"):
            waiter = threading.Thread(target=wait)
            waiter.start()
            assert wait_for(lambda: pool.waiting_sites == ["a"])
            began = time.monotonic()
            pool.stop_waits("cancelled by SIGTERM")
            waiter.join(5)
            assert not waiter.is_alive() and time.monotonic() - began < 2
            assert len(ended) == 1 and isinstance(ended[0], WaitStopped)
            assert str(ended[0]) == "cancelled by SIGTERM"
            with pytest.raises(WaitStopped), pool.slot("b"):
                pass
    finally:
        pool.close()
        holder.close()


def test_a_long_wait_says_once_who_holds_the_cap() -> None:
    """A site that waits longer than `wait_notice` gets one line, in its own thread, with
    what `explain_wait` says of the holders; the wait then goes on and ends as usual."""
    limit = FakeLimit(1)
    holder = SlotPool("cap", ["x"], FakeSlotApi(limit), park=False)
    pool = SlotPool(
        "cap",
        ["a"],
        FakeSlotApi(limit),
        PoolSettings(wait_notice=0.3),
        park=False,
        explain_wait=lambda: "1 of 1 slots of 'cap' held by run night (pid 7, alive)",
    )
    lines: list[tuple[str, str]] = []
    got = threading.Event()

    def said(line: str) -> None:
        lines.append((threading.current_thread().name, line))

    def wait() -> None:
        with pool.slot("a", on_long_wait=said):
            got.set()

    try:
        with holder.slot("x"):
            waiter = threading.Thread(target=wait, name="site-a")
            waiter.start()
            assert wait_for(lambda: bool(lines))
            assert not got.is_set()  # said while it waits
        waiter.join(10)
        assert got.is_set()
    finally:
        pool.close()
        holder.close()
    assert len(lines) == 1
    thread, line = lines[0]
    assert thread == "site-a"
    assert re.fullmatch(
        r"waiting \d+s for a slot: 1 of 1 slots of 'cap' held by run night \(pid 7, alive\)", line
    ), line


def test_doctor_names_each_holder_and_the_orphans_and_fix_frees_only_those(
    api: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`doctor` lists who holds each slot in use (a live run here, a dead one, nobody) and
    marks the orphans; `doctor --fix` gives back the orphans' slots and no other."""
    import os

    from flows.config import load_plan
    from flows.ops.checkup import doctor
    from flows.slots import ledger_home
    from tests.conftest import write_config

    monkeypatch.setenv(ledger_home.LOCAL_SERVER_ENV, str(api.api_url))  # type: ignore[attr-defined]
    name = new_limit(api, 3)
    count_without_lease(api, name, 3)
    folder, key = tmp_path / "leases", ledger_home.ledger_api()
    live = write_ledger(folder, key, this_process_labels(), [{"+": str(uuid4()), "names": [name]}])
    write_ledger(folder, key, dead_labels(), [{"+": str(uuid4()), "names": [name]}])
    holder = json.loads(live.read_text().splitlines()[0])["holder"]
    config = write_config(tmp_path, ["ok-a"], concurrency_tag=name, max_concurrent_sites=3)
    plan = load_plan(str(config))

    lines, well = doctor(plan)
    held = sorted(line for line in lines if line.startswith(f"  {name!r}: "))
    assert len(held) == 3, lines
    assert f"  {name!r}: 1 by no live process (orphaned)" in held
    assert f"  {name!r}: 1 by run {holder} (pid {os.getpid()}, alive)" in held
    (dead,) = [line for line in held if ", dead)" in line]
    assert re.fullmatch(rf"  '{name}': 1 by run \S+ \(pid \d+, dead\) \(orphaned\)", dead)
    assert not well and in_use(api, name) == 3

    lines, well = doctor(plan, fix=True)
    assert in_use(api, name) == 1
    assert doctor(plan)[0].count(f"  {name!r}: 1 by run {holder} (pid {os.getpid()}, alive)") == 1


def test_a_server_is_taken_for_this_home_s_own_only_when_it_says_so(
    api: object, tmp_path: Path
) -> None:
    """The rule for slots nobody holds applies only on a server that reports this
    PREFECT_HOME as its own (another home's server may have taken the port first)."""
    from prefect.settings import PREFECT_HOME, temporary_settings

    from flows.slots.ledger_home import serves_this_home

    assert serves_this_home(api)  # type: ignore[arg-type]
    with temporary_settings({PREFECT_HOME: tmp_path / "another-home"}):
        assert not serves_this_home(api)  # type: ignore[arg-type]


def test_a_pool_waiting_on_a_full_limit_does_not_grow_its_ledger(tmp_path: Path) -> None:
    """A waiting pool asks many times a second; its ask in flight is one small file beside
    the ledger, so the ledger itself stays its header however long the wait."""
    book = ledger.Ledger(tmp_path, "run-1", "api-x")
    limit = FakeLimit(1)
    holder = SlotPool("cap", ["x"], FakeSlotApi(limit), park=False)
    pool = SlotPool("cap", ["a"], FakeSlotApi(limit), park=False, ledger=book)

    def wait() -> None:
        with pytest.raises(WaitStopped), pool.slot("a"):
            pass

    waiter = threading.Thread(target=wait, daemon=True)
    try:
        with holder.slot("x"):
            waiter.start()
            assert wait_for(lambda: limit.calls.count("acquire") >= 20)
            assert len(book.path.read_text().splitlines()) == 1
    finally:
        pool.stop_waits("test over")
        waiter.join(5)
        pool.close()
        holder.close()
