"""Halt (`pipeline.halt`, GNU parallel's `--halt`): the pure rule, and the flow on a real
Prefect API with real pipelines: once the failure that trips it is known no further site
starts, the rest end cancelled with the halt's reason, the run ends Failed naming it, `now`
stops the running pipelines, and `--retry-failed last` runs the halted sites again."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.config import HaltConfig
from flows.halt import HaltTally, halt_reason
from tests.conftest import ROOT, cli_env, read_timeline, run_cli, write_config
from tests.support.processes import hanging_pids, wait_until_gone

# -- the pure rule ---------------------------------------------------------------------------


def rule(**fields: Any) -> HaltConfig:
    return HaltConfig.model_validate(fields)


def test_no_rule_never_halts() -> None:
    """halt: off (None): however many sites failed, the run goes on."""
    assert halt_reason(None, 100, 100) is None


def test_a_count_halts_at_that_many_failures() -> None:
    """failed: 3: two failures go on; the third halts, and the reason names the count and
    the rule."""
    assert halt_reason(rule(failed=3), 2, 10) is None
    assert halt_reason(rule(failed=3), 3, 3) == ("the run halted after 3 failures (halt: 3 failed)")


def test_one_failure_is_singular() -> None:
    """failed: 1: the reason says "1 failure", not "1 failures"."""
    assert halt_reason(rule(failed=1), 1, 1) == "the run halted after 1 failure (halt: 1 failed)"


def test_a_share_is_judged_only_once_min_done_sites_are_done() -> None:
    """failed: "50%", min_done: 4: 1 of 1 (100 %) goes on, since fewer than 4 are done;
    2 of 4 halts; 1 of 4 does not."""
    halt = rule(failed="50%", min_done=4)
    assert halt_reason(halt, 1, 1) is None
    assert halt_reason(halt, 3, 3) is None
    assert halt_reason(halt, 1, 4) is None
    assert halt_reason(halt, 2, 4) == (
        "the run halted after 2 failures (halt: 50% failed (of at least 4 done))"
    )


def test_a_share_without_min_done_is_judged_from_the_first_site() -> None:
    """failed: "30%" (min_done 1): the first site failing is 100 %: halt."""
    assert halt_reason(rule(failed="30%"), 1, 1) is not None
    assert halt_reason(rule(failed="30%"), 0, 5) is None


def test_the_tally_counts_a_site_once_and_only_final_failures() -> None:
    """The same site told twice (its task and the flow) counts once; a succeeded site is done
    but not failed; a cancelled or skipped site is neither; timed out counts as failed."""
    tally = HaltTally(rule(failed=2))
    assert tally.site_done("a", "failed") is None
    assert tally.site_done("a", "failed") is None
    assert tally.site_done("b", "succeeded") is None
    assert tally.site_done("c", "cancelled") is None
    assert tally.site_done("d", "skipped") is None
    assert (tally.failed, tally.done) == ({"a"}, {"a", "b"})
    assert tally.site_done("e", "timed_out") == "the run halted after 2 failures (halt: 2 failed)"


def test_the_tally_keeps_the_reason_of_the_failure_that_tripped_it() -> None:
    """A site still running when the halt trips may fail after it: the run still halted after
    the 2nd failure, told to the tasks and to the flow alike (the flow's message said "after 3"
    where the cancelled sites said "after 2")."""
    tally = HaltTally(rule(failed=2))
    tally.site_done("a", "failed")
    tripped = tally.site_done("b", "failed")
    assert tripped == "the run halted after 2 failures (halt: 2 failed)"
    assert tally.site_done("c", "failed") == tripped
    assert tally.site_done("d", "succeeded") == tripped
    assert len(tally.failed) == 3  # still counted, for the summary's sake


def test_the_halt_rule_is_plain_python() -> None:
    """Importing flows.halt loads neither Prefect nor Dask."""
    code = "import sys, flows.halt; assert not {'prefect', 'dask'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# -- the flow --------------------------------------------------------------------------------


def run(config: Path) -> tuple[Any, dict[str, Any]]:
    from flows.site_pipeline import run_sites

    state = run_sites(config_path=str(config), return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), f"flow ended {state.name}: {state.message}"
    return state, summary


def by_site(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["site"]: entry for entry in summary["sites"]}


def started(folder: Path) -> list[str]:
    return [site for site, what, _ in read_timeline(folder) if what == "start"]


@pytest.mark.usefixtures("prefect_api")
def test_a_halt_over_12_failing_sites_starts_no_site_after_the_third_failure(
    tmp_path: Path,
) -> None:
    """12 failing sites at cap 2, halt failed: 3 (soon): at most 3 + (cap - 1) = 4 pipelines
    ever start; every site that did not start ends cancelled with the halt's reason; the
    flow run ends Failed (not Cancelled), its message led by the halt."""
    sites = [f"fail-{i:02d}" for i in range(12)]
    config = write_config(
        tmp_path,
        sites,
        max_concurrent_sites=2,
        halt={"failed": 3},
        env={"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_SLEEP": "0.3"},
    )
    state, summary = run(config)
    ran = started(tmp_path)
    assert 3 <= len(ran) <= 4, ran
    assert len(set(ran)) == len(ran)  # retry_count 1: one attempt each
    reports = by_site(summary)
    reason = "the run halted after 3 failures (halt: 3 failed)"
    for site in sites:
        if site in ran:
            assert reports[site]["status"] == "failed", reports[site]
        else:
            assert reports[site]["status"] == "cancelled", reports[site]
            assert reports[site]["error"] == reason
            assert reports[site]["attempts"] == 0
    assert state.is_failed(), state
    assert state.message.startswith(reason), state.message
    assert summary["counts"]["cancelled"] == 12 - len(ran)


@pytest.mark.usefixtures("prefect_api")
def test_halt_soon_lets_the_running_site_finish(tmp_path: Path) -> None:
    """when: soon: a slow site already running when the halt trips still succeeds; the site
    still waiting never starts."""
    config = write_config(
        tmp_path,
        ["fail-a", "slow-b", "ok-c"],
        max_concurrent_sites=2,
        halt={"failed": 1},
        env={
            "FAKE_TIMELINE": str(tmp_path / "timeline.tsv"),
            "FAKE_WAIT_FOR": "slow-b",  # fail-a fails only once slow-b surely runs
            "FAKE_SLEEP": "0.3",
            "FAKE_SLOW": "2",
        },
    )
    state, summary = run(config)
    reports = by_site(summary)
    assert reports["fail-a"]["status"] == "failed"
    assert reports["slow-b"]["status"] == "succeeded"
    assert reports["ok-c"]["status"] == "cancelled"
    assert "ok-c" not in started(tmp_path)
    assert state.is_failed()


@pytest.mark.usefixtures("prefect_api")
def test_halt_now_stops_a_running_long_site(tmp_path: Path) -> None:
    """when: now: a hanging site already running when another fails is stopped (its pipeline
    and grandchild are gone) and ends cancelled with the halt's reason; the failed one stays
    failed; the run ends Failed, well before the hanging site would end."""
    config = write_config(
        tmp_path,
        ["fail-a", "hang-b"],
        max_concurrent_sites=2,
        halt={"failed": 1, "when": "now"},
        env={
            "FAKE_TIMELINE": str(tmp_path / "timeline.tsv"),
            "FAKE_PIDS_DIR": str(tmp_path),
            "FAKE_WAIT_FOR": "hang-b",  # fail-a fails only once hang-b surely runs
            "FAKE_SLEEP": "0.3",
        },
    )
    began = time.monotonic()
    state, summary = run(config)
    reports = by_site(summary)
    reason = "the run halted after 1 failure (halt: 1 failed)"
    assert reports["fail-a"]["status"] == "failed"
    assert reports["hang-b"]["status"] == "cancelled", reports["hang-b"]
    assert reports["hang-b"]["error"] == reason
    assert reports["hang-b"]["attempts"] == 1  # it ran, and was stopped
    assert wait_until_gone(hanging_pids(tmp_path, 1, timeout=1)) == []
    assert state.is_failed() and state.message.startswith(reason)
    assert time.monotonic() - began < 60


@pytest.mark.usefixtures("prefect_api")
def test_a_share_halts_once_min_done_sites_are_done(tmp_path: Path) -> None:
    """failed: "50%", min_done: 4 at cap 1: the first site failing (1 of 1) does not halt;
    at 2 failed of 4 done it halts, and the last two sites never start."""
    sites = ["fail-a", "ok-b", "ok-c", "fail-d", "fail-e", "ok-f"]
    config = write_config(
        tmp_path, sites, max_concurrent_sites=1, halt={"failed": "50%", "min_done": 4}
    )
    state, summary = run(config)
    assert started(tmp_path) == sites[:4]
    reports = by_site(summary)
    assert [reports[s]["status"] for s in sites] == [
        "failed",
        "succeeded",
        "succeeded",
        "failed",
        "cancelled",
        "cancelled",
    ]
    assert reports["ok-f"]["error"] == (
        "the run halted after 2 failures (halt: 50% failed (of at least 4 done))"
    )
    assert state.is_failed()


def test_retry_failed_last_runs_the_halted_sites_and_the_failed_ones(
    tmp_path: Path, prefect_api: str
) -> None:
    """A run halts after fail-b (ok-c and ok-d never start); `run --retry-failed last` (halt
    now off) runs fail-b, ok-c and ok-d again and skips ok-a, which succeeded."""
    sites = ["ok-a", "fail-b", "ok-c", "ok-d"]
    config = write_config(tmp_path, sites, max_concurrent_sites=1, halt={"failed": 1})
    env = cli_env(prefect_api)
    first = run_cli(
        ["run", "--config", str(config), "--summary-json", str(tmp_path / "1.json")], env
    )
    assert first.returncode == 1, first.stdout + first.stderr
    statuses = {
        s["site"]: s["status"] for s in json.loads((tmp_path / "1.json").read_text())["sites"]
    }
    assert statuses == {
        "ok-a": "succeeded",
        "fail-b": "failed",
        "ok-c": "cancelled",
        "ok-d": "cancelled",
    }
    body = yaml.safe_load(config.read_text())
    del body["pipeline"]["halt"]
    config.write_text(yaml.safe_dump(body), encoding="utf-8")
    (tmp_path / "timeline.tsv").unlink()
    again = run_cli(
        [
            "run",
            "--config",
            str(config),
            "--retry-failed",
            "last",
            "--summary-json",
            str(tmp_path / "2.json"),
        ],
        env,
    )
    assert again.returncode == 1, again.stdout + again.stderr
    assert "running again 3: fail-b" in again.stdout, again.stdout
    assert sorted(started(tmp_path)) == ["fail-b", "ok-c", "ok-d"]
    statuses = {
        s["site"]: s["status"] for s in json.loads((tmp_path / "2.json").read_text())["sites"]
    }
    assert statuses == {
        "ok-a": "skipped",
        "fail-b": "failed",
        "ok-c": "succeeded",
        "ok-d": "succeeded",
    }
