"""The night after a crash, end to end (issue 43): real CLI runs, real servers, real signals.

- a night SIGKILLed while it holds the cap, then its kept server's idle stop: the next run
  starts at once (it used to wait for ever on slots no process held);
- a run waiting for a slot another run holds says who holds it, and SIGTERM ends it within
  `kill_grace_seconds` + 5 s, as it does in a retry delay; a second signal ends it at once.
"""

from __future__ import annotations

import json
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
from tests.processes import keepers_under, start_tied, stop_keepers, tie_keepers
from tests.test_local_server import embedded_env
from tests.waiting import wait_until

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
        assert wait_until(lambda: started(night, "hang-a", "hang-b"), 120), first.output()
        tie_keepers(home)
        pids = fake_pids(night)
        first.proc.kill()  # a reboot, a closed terminal
        first.proc.wait(10)
        assert wait_until(lambda: not alive(pids), 30), alive(pids)
        assert wait_until(lambda: keepers_under(home) == [], 60)  # the idle stop

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
        assert wait_until(lambda: started(a_dir, "hang-x"), 90), a.output()
        summary = b_dir / "summary.json"
        b = Run(["run", "--config", str(b_config), "--summary-json", str(summary)], env)
        assert wait_until(lambda: b.said("for a slot"), 90), b.output()
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
    assert wait_until(lambda: run.said("retrying in"), 90), run.output()
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
    assert wait_until(lambda: started(tmp_path, "stubborn-s") and bool(fake_pids(tmp_path)), 90)
    pids = fake_pids(tmp_path)
    run.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: run.said("cancelling"), 10), run.output()
    took = run.signal_and_time(signal.SIGTERM)
    assert took < 5, (took, run.output())
    assert run.proc.returncode == 143, run.output()
    assert wait_until(lambda: not alive(pids), 10), alive(pids)
