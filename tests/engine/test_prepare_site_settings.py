"""Issue 21 on a real flow (the Prefect test harness, real pipelines): the start order from
history, per-site settings reaching Prefect and the attempt, and group caps without
head-of-line blocking."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.cli import main
from flows.config import group_limit_name
from flows.site_pipeline import run_sites
from tests.conftest import read_timeline, write_config
from tests.support.timeline import max_overlap

pytestmark = pytest.mark.usefixtures("prefect_api")


def run(config: Path) -> tuple[Any, dict[str, Any]]:
    state = run_sites(config_path=str(config), return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), f"flow ended {state.name}: {state.message}"
    return state, summary


def starts(folder: Path) -> list[str]:
    return [site for site, what, _ in read_timeline(folder) if what == "start"]


def sleeping(site: str, seconds: float, **more: Any) -> dict[str, Any]:
    """A site entry whose fake pipeline sleeps `seconds` (its own env over the config's)."""
    return {"site": site, "env": {"FAKE_SLEEP": str(seconds)}, **more}


def test_the_longest_expected_site_starts_first_once_there_is_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One night records each site's duration; the next starts the new site (no history)
    first, then the known ones longest first; `order: listed` and the sequential loop keep
    list order, and a priority goes before either rule. The summary keeps the list's order,
    and `validate` shows the order a run would use."""
    tag = uuid4().hex[:6]  # names no other test has run: this test's history is its own
    short, long_, mid, new = (f"{name}-{tag}" for name in ("short", "long", "mid", "new"))
    known = [sleeping(short, 0.05), sleeping(long_, 0.9), sleeping(mid, 0.4)]
    run(write_config(tmp_path, known, max_concurrent_sites=1, order="longest_first"))
    assert starts(tmp_path) == [short, long_, mid]  # no history yet: list order

    sites = [*known, sleeping(new, 0.2)]
    for order, expected in (
        ("longest_first", [new, long_, mid, short]),
        ("listed", [short, long_, mid, new]),
    ):
        (tmp_path / "timeline.tsv").unlink()
        _, summary = run(write_config(tmp_path, sites, max_concurrent_sites=1, order=order))
        assert starts(tmp_path) == expected, order
        assert [entry["site"] for entry in summary["sites"]] == [short, long_, mid, new]

    main(["validate", "--config", str(write_config(tmp_path, sites, order="longest_first"))])
    shown = capsys.readouterr().out
    assert "order: longest expected first (all 4 sites have history)" in shown, shown
    assert f"starts: {long_}, {mid}, {new}, {short}" in shown  # what a run would do now

    (tmp_path / "timeline.tsv").unlink()
    run(write_config(tmp_path, sites, order="longest_first", use_async=False))
    assert starts(tmp_path) == [short, long_, mid, new]  # the old loop: list order

    (tmp_path / "timeline.tsv").unlink()
    first = [*known[:2], sleeping(mid, 0.4, priority=1), sleeping(new, 0.2)]
    run(write_config(tmp_path, first, max_concurrent_sites=1, order="longest_first"))
    assert starts(tmp_path) == [mid, long_, new, short]  # `new` has a history by now


def test_per_site_settings_reach_prefect_and_the_attempt(tmp_path: Path) -> None:
    """A site's own retry_count is its task run's retries in Prefect, its own timeout is the
    one its attempt really has, its flags are argv elements after default_flags, and its env
    is merged over the config's; a learned timeout never exceeds the site's own timeout."""
    sites = [
        {"site": "flaky-once", "retry_count": 1},  # fails attempt 1, and has no second
        {"site": "flaky-twice", "retry_count": 2},  # succeeds on attempt 2
        "flaky-default",  # the config's retry_count: 3
        {"site": "hang-short", "timeout": 1.5, "retry_count": 1},
        {"site": "ok-flags", "flags": ["--depth", "3 levels", "{attempt}"]},
        {"site": "ok-env", "env": {"FAKE_RECORDS": "7"}},
        {"site": f"ok-capped-{uuid4().hex[:6]}", "timeout": 5},
    ]
    config = write_config(
        tmp_path,
        sites,
        retry_count=3,
        retry_delay=0,
        default_flags=["--emit-status"],
        env={"FAKE_RECORDS": "1", "FAKE_PIDS_DIR": str(tmp_path)},
        learned_timeout={"factor": 3, "min_runs": 1, "window": 5, "floor": 120},
    )
    _, first = run(config)
    capped = sites[-1]["site"]
    assert {e["site"]: e for e in first["sites"]}[capped]["timeout_s"] == 5  # no history yet
    _, summary = run(config)
    rows = {entry["site"]: entry for entry in summary["sites"]}
    assert rows["flaky-once"]["status"] == "failed" and rows["flaky-once"]["attempts"] == 1
    assert rows["flaky-twice"]["status"] == "succeeded" and rows["flaky-twice"]["attempts"] == 2
    assert rows["flaky-default"]["status"] == "succeeded"
    hung = rows["hang-short"]
    assert hung["status"] == "timed_out" and hung["timeout_s"] == 1.5
    assert hung["error"].startswith("timed out after 1.5 s")
    assert rows["ok-flags"]["timeout_s"] == 60  # the config's (learned: at least the floor)
    assert rows[capped]["timeout_s"] == 5  # learned 120 s, but never above the site's own
    assert rows["ok-flags"]["result"]["extra"] == ["--emit-status", "--depth", "3 levels", "1"]
    assert rows["ok-env"]["result"]["records"] == 7
    assert rows["ok-flags"]["result"]["records"] == 1
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(summary["flow_run_id"])]))
        )
    retries = {task_run.name: task_run.empirical_policy.retries for task_run in task_runs}
    assert retries == {
        "flaky-once": 0,
        "flaky-twice": 1,
        "flaky-default": 2,
        "hang-short": 0,
        "ok-flags": 2,
        "ok-env": 2,
        capped: 2,
    }


def test_a_site_waiting_for_its_group_holds_no_global_slot(tmp_path: Path) -> None:
    """Group cap 1, four group sites listed first, global cap 2: the group sites take their
    turns one at a time while the other sites run in the second global slot; never more than
    2 in all; the group's limit is a Prefect limit of its own, given back at the end."""
    group_sites = [sleeping(f"grp-{i}.vendor.test", 0.8) for i in range(4)]
    others = [sleeping(f"other-{i}", 0.3) for i in range(6)]
    config = write_config(
        tmp_path,
        [*group_sites, *others],
        max_concurrent_sites=2,
        groups={"vendor": {"max_concurrent": 1, "match": r"\.vendor\.test$"}},
    )
    _, summary = run(config)
    assert summary["counts"]["succeeded"] == 10
    rows = read_timeline(tmp_path)
    in_group = [row for row in rows if row[0].startswith("grp-")]
    assert max_overlap(rows) == 2
    assert max_overlap(in_group) == 1
    spans = {site: [t for s, _, t in rows if s == site] for site, _, _ in rows}
    first_group_end = min(spans[f"grp-{i}.vendor.test"][1] for i in range(4))
    last_group_start = max(spans[f"grp-{i}.vendor.test"][0] for i in range(4))
    other_starts = [spans[f"other-{i}"][0] for i in range(6)]
    assert min(other_starts) < first_group_end  # no head-of-line blocking
    assert sum(start < last_group_start for start in other_starts) >= 3  # they ran meanwhile
    tag = f"test-{tmp_path.name}"[:60].replace("[", "-").replace("]", "")
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(group_limit_name(tag, "vendor"))
        assert limit.limit == 1 and limit.active_slots == 0
        assert client.read_global_concurrency_limit_by_name(tag).active_slots == 0


def test_validate_orders_by_the_same_history_window_as_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With `learned_timeout.window: 1` a site's expected duration is its last success: the
    site that was slow once and fast last starts after the steady one, in the run and in what
    `validate` prints (which used a fixed window of 20, and printed the opposite order)."""
    tag = uuid4().hex[:6]
    once_slow, steady = f"once-slow-{tag}", f"steady-{tag}"
    for first in (0.9, 0.05):
        run(write_config(tmp_path, [sleeping(once_slow, first), sleeping(steady, 0.4)]))
    sites = [sleeping(once_slow, 0.05), sleeping(steady, 0.4)]
    learned = {"window": 1, "min_runs": 1}
    config = write_config(
        tmp_path, sites, max_concurrent_sites=1, order="longest_first", learned_timeout=learned
    )
    main(["validate", "--config", str(config)])
    shown = capsys.readouterr().out
    assert f"starts: {steady}, {once_slow}" in shown, shown
    (tmp_path / "timeline.tsv").unlink()
    run(config)
    assert starts(tmp_path) == [steady, once_slow]
