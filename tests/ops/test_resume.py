"""`--retry-failed`: which sites run again, and how the skipped ones are reported."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import psutil
import pytest

from flows.config import ConfigError
from flows.failure_causes import failure_message
from flows.ops.resume import EarlierRun, choose
from flows.process.holders import holder_alive, holder_labels, this_process_labels
from flows.report import as_bools, build_summary, skipped_reports

SITES = ("a", "b", "c", "d", "e", "f")


def earlier(
    outcomes: dict[str, str],
    *,
    state: str = "Failed",
    final: bool = True,
    alive: bool | None = None,
    skip: dict[str, str] | None = None,
) -> EarlierRun:
    return EarlierRun(
        id="11111111-1111-1111-1111-111111111111",
        name="brave-run",
        state=state,
        final=final,
        parameters={"skip": skip} if skip else {},
        sites=SITES,
        outcomes=outcomes,
        holder_alive=alive,
    )


def test_only_sites_that_did_not_succeed_run_again_in_list_order() -> None:
    """Completed sites are skipped with a note naming the run; failed, timed out, cancelled,
    crashed and never-started ones run again, in the run's order, each with its reason."""
    choice = choose(
        earlier(
            {"a": "Completed", "b": "Failed", "c": "Cancelled", "e": "Completed", "f": "Crashed"}
        )
    )
    assert choice.rerun == ("b", "c", "d", "f")
    assert set(choice.skip) == {"a", "e"}
    assert choice.skip["a"] == (
        "succeeded in flow run brave-run (11111111-1111-1111-1111-111111111111)"
    )
    assert choice.why == {"b": "failed", "c": "cancelled", "d": "never started", "f": "crashed"}


def test_a_run_whose_process_is_gone_is_resumed_and_its_running_sites_rerun() -> None:
    """A run left Running by a dead process: its Running sites run again."""
    choice = choose(
        earlier({"a": "Completed", "b": "Running"}, state="Running", final=False, alive=False)
    )
    assert choice.rerun == ("b", "c", "d", "e", "f")
    assert choice.why["b"] == "left Running by a process that is gone"


@pytest.mark.parametrize(("alive", "says"), [(True, "still alive"), (None, "can't tell")])
def test_a_run_that_may_still_run_is_refused(alive: bool | None, says: str) -> None:
    """Resuming a run that may still be running would run its sites twice at once: refused,
    with the run's name and what to do."""
    with pytest.raises(ConfigError) as caught:
        choose(earlier({}, state="Running", final=False, alive=alive))
    assert "brave-run" in str(caught.value) and says in str(caught.value)
    assert "doctor --fix" in str(caught.value)


def test_sites_skipped_by_the_resumed_run_stay_skipped() -> None:
    """Resuming a resume: what the earlier run skipped (it had no task run) keeps its note."""
    choice = choose(
        earlier({"b": "Completed", "c": "Failed"}, skip={"a": "succeeded in flow run first"})
    )
    assert choice.skip["a"] == "succeeded in flow run first"
    assert "b" in choice.skip and choice.rerun == ("c", "d", "e", "f")


def test_skipped_sites_count_as_done_not_failed() -> None:
    """A summary with skipped sites and succeeded ones is Completed; skipped is True in the
    dict[site, bool] view, and is not in the failure line."""
    reports = list(skipped_reports(["a", "b"], {"a": "succeeded before"}).values())
    from flows.report import SiteReport

    reports.append(SiteReport("b", "succeeded", 1, 0, 0.1))
    summary = build_summary("id", reports)
    assert summary["state"] == "Completed"
    assert summary["counts"]["skipped"] == 1 and summary["sites"][0]["error"] == (
        "succeeded before"
    )
    assert as_bools(summary) == {"a": True, "b": True}
    assert failure_message(reports) is None
    reports[1].status = "failed"
    assert failure_message(reports) == (
        "1 of 2 sites failed: 1 \N{MULTIPLICATION SIGN} exit code 0 (b)"
    )


def test_a_skip_for_a_site_outside_the_list_is_a_config_error() -> None:
    """`skip` names only sites of the run: anything else is refused before the run."""
    with pytest.raises(ConfigError, match=r'skip = \["zzz"\]: expected sites'):
        skipped_reports(["a"], {"zzz": "x"})
    many = {f"x{i}": "x" for i in range(7)}
    with pytest.raises(ConfigError) as raised:
        skipped_reports(["a"], many)
    assert str(raised.value) == (
        'skip = ["x0", "x1", "x2", "x3", "x4"]: expected sites of the run\'s site list'
    )


def test_a_skipped_site_ran_no_attempt_and_took_no_time() -> None:
    """A skipped site's row: status skipped, 0 attempts, no exit code, 0 s, the note as its
    error, no result, and no usage (it ran no attempt)."""
    (report,) = skipped_reports(["a", "b"], {"b": "succeeded in flow run x"}).values()
    assert report.to_json() == {
        "site": "b",
        "status": "skipped",
        "attempts": 0,
        "exit_code": None,
        "duration_s": 0.0,
        "error": "succeeded in flow run x",
        "result": None,
        "check": None,
        "timeout_s": None,
        "cause": None,
        "logs": [],
        "peak_rss_mb": None,
        "cpu_s": None,
        "usage": [],
        "stopped_by": None,
    }


def test_holder_alive_tells_this_process_a_dead_one_and_another_host() -> None:
    """The labels name this process: alive. A process that exited: gone. A pid reused by a
    process started at another time: gone. Another host: can't tell (None)."""
    assert holder_alive(this_process_labels()) is True
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(child.pid).create_time()
    child.wait()
    assert holder_alive(holder_labels(child.pid, started)) is False
    assert holder_alive(holder_labels(os.getpid(), started - 1000)) is False
    other = {**this_process_labels(), "site-pipeline.host": socket.gethostname() + "-other"}
    assert holder_alive(other) is None
    assert holder_alive({}) is None


@pytest.mark.parametrize("module", ["flows.ops", "flows.ops.resume"])
def test_the_cli_s_start_can_import_choose_without_loading_prefect(module: str) -> None:
    """`flows.ops` and `flows.ops.resume` (which the CLI imports at its start, for `choose`)
    load neither Prefect nor Dask; `earlier_run` loads Prefect only when called."""
    from tests.support.imports import loaded_heavy

    assert loaded_heavy(module) == []


def test_flows_ops_exports_its_functions_even_once_their_modules_are_loaded() -> None:
    """Each name `flows.ops` exports is the function or class, not a module of that name,
    whether or not the modules it lives in were imported."""
    import types

    import flows.ops
    import flows.ops.checkup
    import flows.ops.provision
    import flows.ops.run_history

    for name in flows.ops.__all__:
        value = getattr(flows.ops, name)
        assert not isinstance(value, types.ModuleType), name
        assert callable(value), name
    assert flows.ops.history is flows.ops.run_history.history
    assert flows.ops.doctor is flows.ops.checkup.doctor
    assert flows.ops.setup is flows.ops.provision.setup


def test_one_rule_tells_a_process_from_one_that_reused_its_pid() -> None:
    """`same_process` is the one rule (the flow's labels, the ledgers, the kept server's
    keeper and users): the pid runs and started within half a second of the recorded time."""
    from flows.process.holders import same_process

    started = psutil.Process().create_time()
    assert same_process(os.getpid(), started)
    assert same_process(os.getpid(), round(started, 2))  # as a label keeps it
    assert not same_process(os.getpid(), started + 0.6)  # a reused pid starts later
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child_started = psutil.Process(child.pid).create_time()
    child.wait()
    assert not same_process(child.pid, child_started)
