"""Stalled pipelines (`stall_timeout`) and what a timeout says: real processes, no Prefect."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from flows.process.attempt import AttemptOutcome, run_attempt
from tests.conftest import FAKE
from tests.support.processes import alive, hanging_pids

CAUSE_FAKE = Path(__file__).resolve().parents[1] / "support" / "fakes" / "cause_pipeline.py"


def run(argv: list[str], tmp_path: Path, **more: object) -> AttemptOutcome:
    env = {**os.environ, "FAKE_PIDS_DIR": str(tmp_path), "FAKE_DRIP": "1.5"}
    options: dict[str, object] = {"timeout": 30, "kill_grace": 0.5, **more}
    return run_attempt(argv, cwd=tmp_path, env=env, log=lambda _: None, **options)  # type: ignore[arg-type]


def cause_fake(site: str) -> list[str]:
    return [sys.executable, str(CAUSE_FAKE), "--site", site]


def test_a_pipeline_silent_for_the_stall_timeout_is_stopped_as_stalled(tmp_path: Path) -> None:
    """It prints a line, then nothing: after stall_timeout (not the 30 s timeout) it is
    stopped (TERM), status timed_out, error `stalled: no output for 1 s`, and its last line
    is the cause."""
    started = time.monotonic()
    outcome = run(cause_fake("stall-a"), tmp_path, stall_timeout=1.0)
    elapsed = time.monotonic() - started
    assert outcome.status == "timed_out" and outcome.exit_code == -15
    assert outcome.error == "stalled: no output for 1 s"
    assert outcome.ending == "stalled"  # what stopped it, as data (the report's `stopped_by`)
    assert outcome.cause == "connecting to db.example"
    assert 1.0 <= elapsed < 10


def test_output_keeps_a_pipeline_from_stalling(tmp_path: Path) -> None:
    """A line every 0.1 s for 1.5 s, with stall_timeout 0.5: never silent that long, so it
    runs to its end and succeeds (the stall clock restarts at every output)."""
    outcome = run(cause_fake("drip-a"), tmp_path, stall_timeout=0.5)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.duration_s >= 1.5


def test_without_stall_timeout_a_silent_pipeline_runs_to_its_timeout(tmp_path: Path) -> None:
    """stall_timeout off (None): silence is fine until the attempt's timeout, and then the
    error says `timed out after N s` with the last line seen."""
    started = time.monotonic()
    outcome = run(cause_fake("stall-a"), tmp_path, timeout=1.5)
    assert time.monotonic() - started >= 1.5
    assert outcome.status == "timed_out"
    assert outcome.error == "timed out after 1.5 s: connecting to db.example"
    assert outcome.cause == "connecting to db.example"


def test_a_timeout_with_nothing_printed_says_only_the_time(tmp_path: Path) -> None:
    """A timed-out pipeline that printed nothing: `timed out after 1 s`, no cause."""
    outcome = run([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, timeout=1)
    assert (outcome.error, outcome.cause) == ("timed out after 1 s", None)


def test_a_stalled_tree_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    """A stalled pipeline that ignores SIGTERM and has a grandchild: stopped like a timeout,
    SIGKILL after kill_grace, and no process of its tree is left."""
    started = time.monotonic()
    argv = [sys.executable, str(FAKE), "--site", "stubborn.com"]
    outcome = run(argv, tmp_path, stall_timeout=1.0, kill_grace=0.5)
    elapsed = time.monotonic() - started
    pipeline, grandchild = hanging_pids(tmp_path, timeout=10)
    assert outcome.error == "stalled: no output for 1 s" and outcome.exit_code == -9
    assert elapsed >= 1.0 + 0.5 - 0.05
    assert not alive(pipeline) and not alive(grandchild)


def test_the_stall_is_timed_from_the_last_output_not_the_start(tmp_path: Path) -> None:
    """A line every 0.1 s for 1.5 s (the last one at about 1.4 s), then silence: stopped
    about stall_timeout after the last line, well past stall_timeout after the start."""
    script = (
        "import time\n"
        "for _ in range(15):\n    print('tick', flush=True); time.sleep(0.1)\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    outcome = run([sys.executable, "-c", script], tmp_path, stall_timeout=0.8)
    elapsed = time.monotonic() - started
    assert outcome.error == "stalled: no output for 0.8 s"
    assert 1.4 + 0.8 - 0.05 <= elapsed < 15
