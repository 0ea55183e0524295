"""The night after a crash, end to end (issue 43): real CLI runs, real servers, real signals.

- a night SIGKILLed while it holds the cap, then its kept server's idle stop: the next run
  starts at once (it used to wait for ever on slots no process held);
- a run waiting for a slot another run holds says who holds it, and SIGTERM ends it within
  `kill_grace_seconds` + 5 s, as it does in a retry delay; a second signal ends it at once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ROOT, cli_env, read_timeline, run_cli, write_config
from tests.support.processes import keepers_under, start_tied, stop_keepers, tie_keepers
from tests.support.servers import embedded_env
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


class Run:
    """`python -m flows ARGS` in a process group of its own, its output read as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = start_tied(
            [sys.executable, "-m", "flows", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def said(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in self.lines)

    def signal_and_time(self, sig: int, timeout: float = 60) -> float:
        """Send `sig`; the seconds until the process ended."""
        began = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(timeout)
        self._reader.join(10)
        return time.monotonic() - began

    def output(self) -> str:
        return "\n".join(self.lines)


def started(folder: Path, *sites: str) -> bool:
    began = {site for site, what, _ in read_timeline(folder) if what == "start"}
    return set(sites) <= began


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if psutil.pid_exists(pid)]


def fake_pids(folder: Path) -> list[int]:
    return [int(p) for f in folder.glob("*.pids") for p in f.read_text().split()]


def test_a_night_killed_holding_the_cap_then_idle_stopped_leaves_the_next_night_free(
    tmp_path: Path,
) -> None:
    """Run 1 holds both slots of the cap (two hanging sites) and is SIGKILLed; its kept
    server then stops when idle. Run 2, on a new server (another port, leases in memory
    gone, the slots still counted), gives the slots back at its start and runs every site;
    no process of run 1 is left."""
    home = tmp_path / "home"
    env = embedded_env(home)
    night = tmp_path / "night"
    night.mkdir()
    config = write_config(
        night, ["hang-a", "hang-b"], local_server_idle=2, max_concurrent_sites=2,
        concurrency_tag="night-cap", timeout=600,
    )  # fmt: skip
    try:
        first = Run(["run", "--config", str(config)], env)
        wait_until(lambda: started(night, "hang-a", "hang-b"), "both sites started", 120)
        tie_keepers(home)
        pids = fake_pids(night)
        first.proc.kill()  # a reboot, a closed terminal
        first.proc.wait(10)
        wait_until(lambda: not alive(pids), "the pipelines gone", 30)
        wait_until(lambda: keepers_under(home) == [], "the idle stop", 60)

        after = tmp_path / "after"
        after.mkdir()
        config = write_config(
            after, ["ok-1", "ok-2", "ok-3"], local_server_idle=2, max_concurrent_sites=2,
            concurrency_tag="night-cap",
        )  # fmt: skip
        began = time.monotonic()
        second = run_cli(["run", "--config", str(config)], env, timeout=120)
        tie_keepers(home)
        assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
        assert "gave back" in second.stdout + second.stderr
        assert started(after, "ok-1", "ok-2", "ok-3")
        assert time.monotonic() - began < 90
    finally:
        stop_keepers(home)


def test_a_run_waiting_for_a_slot_says_who_holds_it_and_sigterm_ends_it_in_time(
    tmp_path: Path, prefect_api: str
) -> None:
    """Run A holds the only slot; run B's site waits, says after `slot_wait_notice` that
    the slot is held by A's run (its pid, alive), and SIGTERM ends B within the grace + 5 s:
    exit 143, its site `cancelled`, the summary written."""
    env = cli_env(prefect_api)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    tag = f"wait-{tmp_path.name}"[:50]
    a_config = write_config(a_dir, ["hang-x"], max_concurrent_sites=1, concurrency_tag=tag)
    b_config = write_config(
        b_dir, ["ok-w"], max_concurrent_sites=1, concurrency_tag=tag, slot_wait_notice=1
    )
    a = Run(["run", "--config", str(a_config)], env)
    try:
        wait_until(lambda: started(a_dir, "hang-x"), "run A started", 90)
        summary = b_dir / "summary.json"
        b = Run(["run", "--config", str(b_config), "--summary-json", str(summary)], env)
        wait_until(lambda: b.said("for a slot"), "the wait line", 90)
        took = b.signal_and_time(signal.SIGTERM)
        assert b.proc.returncode == 143, b.output()
        assert took <= 1 + 5, took
        line = next(line for line in b.lines if "for a slot" in line)
        assert re.search(
            rf"1 of 1 slots of '{tag}' held by run \S+ \(pid {a.proc.pid}, alive\)", line
        ), line
        data: dict[str, Any] = json.loads(summary.read_text())
        assert [(s["site"], s["status"]) for s in data["sites"]] == [("ok-w", "cancelled")]
        assert not started(b_dir, "ok-w")
    finally:
        a.signal_and_time(signal.SIGTERM)
    assert a.proc.returncode == 143


def test_sigterm_in_a_retry_delay_ends_the_run_in_time_with_the_attempt_kept(
    tmp_path: Path, prefect_api: str
) -> None:
    """A site that failed its first attempt sleeps through a 120 s retry delay in Prefect's
    task engine; SIGTERM ends the run within the grace + 5 s: exit 143, the site `cancelled`
    with its one attempt and what it failed with."""
    summary = tmp_path / "summary.json"
    config = write_config(tmp_path, ["flaky-r"], retry_count=2, retry_delay=120)
    run = Run(
        ["run", "--config", str(config), "--summary-json", str(summary)], cli_env(prefect_api)
    )
    wait_until(lambda: run.said("retrying in"), "the retry line", 90)
    took = run.signal_and_time(signal.SIGTERM)
    assert run.proc.returncode == 143, run.output()
    assert took <= 1 + 5, took
    (site,) = json.loads(summary.read_text())["sites"]
    assert site["status"] == "cancelled" and site["attempts"] == 1, site
    assert "retry delay" in site["error"], site


def test_a_second_signal_ends_the_run_at_once_and_leaves_no_process(
    tmp_path: Path, prefect_api: str
) -> None:
    """The first SIGTERM stops politely: a pipeline that ignores SIGTERM gets the whole
    `kill_grace_seconds` (30 here). The second ends the run at once, its pipelines killed."""
    config = write_config(tmp_path, ["stubborn-s"], kill_grace_seconds=30)
    run = Run(["run", "--config", str(config)], cli_env(prefect_api))
    wait_until(lambda: started(tmp_path, "stubborn-s") and fake_pids(tmp_path), "started", 90)
    pids = fake_pids(tmp_path)
    run.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: run.said("cancelling"), "the cancelling line", 10)
    took = run.signal_and_time(signal.SIGTERM)
    assert took < 5, (took, run.output())
    assert run.proc.returncode == 143, run.output()
    wait_until(lambda: not alive(pids), "the pipelines gone", 10)


def tree_of(pid: int) -> list[int]:
    try:
        proc = psutil.Process(pid)
        return [pid, *(child.pid for child in proc.children(recursive=True))]
    except psutil.Error:
        return []


def server_pids(home: Path) -> list[int]:
    """The kept server of `home`: its keeper's children (`prefect server start`, uvicorn)."""
    return [pid for keeper in keepers_under(home) for pid in tree_of(keeper.pid)[1:]]


def next_night_works(home: Path, folder: Path, tag: str) -> subprocess.CompletedProcess[str]:
    """A run of three quick sites at the same cap, on the same home: it must succeed, each
    site started once, never more than the cap at once."""
    folder.mkdir()
    config = write_config(
        folder, ["ok-1", "ok-2", "ok-3"], local_server_idle=2, max_concurrent_sites=2,
        concurrency_tag=tag,
    )  # fmt: skip
    done = run_cli(["run", "--config", str(config)], embedded_env(home), timeout=150)
    tie_keepers(home)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    starts = [site for site, what, _ in read_timeline(folder) if what == "start"]
    assert sorted(starts) == ["ok-1", "ok-2", "ok-3"]
    return done


@pytest.mark.parametrize("fault", ["keeper", "server", "reboot"])
def test_a_fault_of_the_kept_server_mid_run_leaves_no_process_and_the_next_run_works(
    tmp_path: Path, fault: str
) -> None:
    """The fault table of docs/behaviour.md ("After a crash"), for the kept server. Mid-run,
    with both slots of the cap held: SIGKILL of the keeper (its server goes with it), of the
    server, or of everything at once (a reboot: the run, its pipelines, the keeper, the
    server). The run ends (or is gone); no process of it or of the server is left; a second
    home's run beside it is untouched; the next run on the home gives the slots back and
    runs every site once."""
    home, other = tmp_path / "home", tmp_path / "other-home"
    night = tmp_path / "night"
    night.mkdir()
    config = write_config(
        night, ["slow-a", "slow-b"], local_server_idle=2, max_concurrent_sites=2,
        concurrency_tag="fault-cap", timeout=120, api_patience=5, env={
            "FAKE_TIMELINE": str(night / "timeline.tsv"), "FAKE_SLOW": "6",
        },
    )  # fmt: skip
    beside = tmp_path / "beside"
    beside.mkdir()
    beside_config = write_config(
        beside, ["slow-z"], local_server_idle=2, concurrency_tag="fault-cap",
        env={"FAKE_TIMELINE": str(beside / "timeline.tsv"), "FAKE_SLOW": "6"},
    )  # fmt: skip
    try:
        first = Run(["run", "--config", str(config)], embedded_env(home))
        second_home = Run(["run", "--config", str(beside_config)], embedded_env(other))
        wait_until(lambda: started(night, "slow-a", "slow-b"), "both sites started", 120)
        tie_keepers(home), tie_keepers(other)
        run_tree, server = tree_of(first.proc.pid), server_pids(home)
        (keeper,) = [k.pid for k in keepers_under(home)]
        victims = {"keeper": [keeper], "server": server[:1], "reboot": [*run_tree, keeper, *server]}
        for pid in victims[fault]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.proc.wait(120)  # api_patience: the API may fail 5 s, then the run ends
        left = [*run_tree[1:], keeper, *server]
        wait_until(lambda: not alive(left), "no process of the run or the server", 60)
        second_home.proc.wait(120)
        assert second_home.proc.returncode == 0, second_home.output()
        done = next_night_works(home, tmp_path / "after", "fault-cap")
        # It ran every site at the cap of 2, so no slot was left held. Who gave the slots
        # back: the next run, where the server died at once; after the keeper's SIGKILL the
        # reaper's SIGTERM lets the server finish a request, in which the run may give them
        # back itself (a CI run did).
        if fault != "keeper":
            assert "gave back" in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    finally:
        stop_keepers(home), stop_keepers(other)


def test_a_run_that_starts_while_the_kept_server_stops_when_idle_starts_a_new_one(
    tmp_path: Path,
) -> None:
    """The keeper removes the state file and stops its server under the lock; a run that
    starts in that moment waits for the lock, finds no server and starts a new one, and
    runs every site."""
    home = tmp_path / "home"
    first = tmp_path / "first"
    first.mkdir()
    config = write_config(first, ["ok-a"], local_server_idle=1)
    try:
        done = run_cli(["run", "--config", str(config)], embedded_env(home), timeout=150)
        tie_keepers(home)
        assert done.returncode == 0, done.stderr[-3000:]
        old = [k.pid for k in keepers_under(home)]
        wait_until(lambda: not (home / "local-server.json").exists(), "the idle stop began", 60)
        done = next_night_works(home, tmp_path / "next", f"test-{first.name}")
        assert "started a local Prefect server" in done.stderr, done.stderr[-3000:]
        assert not alive(old)
    finally:
        stop_keepers(home)


def test_sigterm_while_the_kept_server_starts_ends_the_command_at_once(tmp_path: Path) -> None:
    """Before the flow run exists (a new home's kept server takes seconds to answer) there
    is nothing to cancel politely: SIGTERM ends the command at once, exit 143, no site run."""
    home = tmp_path / "home"
    config = write_config(tmp_path, ["ok-a"], local_server_idle=2)
    try:
        run = Run(["run", "--config", str(config)], embedded_env(home))
        wait_until(lambda: keepers_under(home), "the keeper started", 60)
        took = run.signal_and_time(signal.SIGTERM)
        assert run.proc.returncode == 143, run.output()
        assert took < 5, (took, run.output())
        assert not started(tmp_path, "ok-a")
    finally:
        stop_keepers(home)
    wait_until(lambda: not servers_of(home), "no server of the home left", 30)


def servers_of(home: Path) -> list[int]:
    """`prefect server start` processes (anywhere, orphans too) whose PREFECT_HOME is `home`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if "prefect" in " ".join(argv) and "server" in argv and "start" in argv:
            try:
                if proc.environ().get("PREFECT_HOME") == str(home):
                    found.append(proc.pid)
            except psutil.Error:
                pass
    return found
