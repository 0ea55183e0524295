"""The engine's wiring of issue 22, on a real Prefect API with real pipelines: a real Python
ModuleNotFoundError is not retried (by the default `non_retryable_errors`) and its cause
reaches the summary; each attempt's log file is listed in the report; `keep_logs` prunes the
older runs' logs when the site starts; a stalled pipeline is stopped and retried."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flows.config import site_output_dir
from flows.site_pipeline import run_sites
from tests.conftest import read_timeline, write_config

pytestmark = pytest.mark.usefixtures("prefect_api")

PYERR = Path(__file__).resolve().parents[1] / "support" / "fakes" / "pyerr_pipeline.py"
COMMAND = ["{python}", str(PYERR), "--site", "{site}"]
MISSING = "ModuleNotFoundError: No module named 'nopkg_site_pipeline_fake'"


def run(config: Path) -> tuple[Any, dict[str, Any]]:
    state = run_sites(config_path=str(config), return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), f"flow ended {state.name}: {state.message}"
    return state, summary


def only(summary: dict[str, Any]) -> dict[str, Any]:
    (entry,) = summary["sites"]
    return dict(entry)


def starts(folder: Path) -> int:
    return len([row for row in read_timeline(folder) if row[1] == "start"])


def test_a_real_module_not_found_error_runs_one_attempt_and_says_why(tmp_path: Path) -> None:
    """retry_count 3 and a pipeline that raises a real ModuleNotFoundError: one attempt (the
    default non_retryable_errors), the site failed with the cause in `error` and `cause`, and
    its one attempt log (absolute, under the site's output folder) holds the traceback."""
    config = write_config(tmp_path, ["pyerr-a"], retry_count=3, command=COMMAND)
    state, summary = run(config)
    entry = only(summary)
    assert starts(tmp_path) == 1
    assert (entry["status"], entry["attempts"]) == ("failed", 1)
    assert entry["cause"] == MISSING
    assert entry["error"] == f"exit code 1: {MISSING}"
    (log,) = entry["logs"]
    path = Path(log)
    assert path.is_absolute() and path.is_file()
    assert path.is_relative_to(site_output_dir((tmp_path / "output").resolve(), "pyerr-a"))
    assert MISSING in path.read_text(encoding="utf-8", errors="replace")
    assert state.is_failed()


def test_with_no_rules_a_module_not_found_error_is_retried(tmp_path: Path) -> None:
    """`non_retryable_errors: []`: the same error runs all three attempts, and the report
    lists three attempt logs in attempt order."""
    config = write_config(
        tmp_path, ["pyerr-a"], retry_count=3, command=COMMAND, non_retryable_errors=[]
    )
    _, summary = run(config)
    entry = only(summary)
    assert starts(tmp_path) == 3
    assert (entry["status"], entry["attempts"]) == ("failed", 3)
    assert [Path(log).name for log in entry["logs"]] == [
        "attempt-1.log",
        "attempt-2.log",
        "attempt-3.log",
    ]


def test_keep_logs_prunes_the_older_runs_logs_when_the_site_starts(tmp_path: Path) -> None:
    """keep_logs: 2 over three runs: after the third, the site keeps the log folders of the
    last two runs, the current one among them."""
    config = write_config(tmp_path, ["ok-a"], keep_logs=2)
    logs = []
    for _ in range(3):
        _, summary = run(config)
        (log,) = only(summary)["logs"]
        logs.append(Path(log))
    kept = sorted(
        p.name
        for p in (site_output_dir((tmp_path / "output").resolve(), "ok-a") / "logs").iterdir()
    )
    assert kept == sorted(log.parent.name for log in logs[1:])
    assert logs[-1].is_file()


def test_a_stalled_pipeline_is_stopped_and_retried_like_a_timeout(tmp_path: Path) -> None:
    """stall_timeout 1 and a pipeline that prints one line then nothing: each attempt is
    stopped (timed_out, "stalled: no output for 1 s") long before `timeout`, and retried."""
    config = write_config(tmp_path, ["hang-a"], retry_count=2, stall_timeout=1, timeout=120)
    state, summary = run(config)
    entry = only(summary)
    assert (entry["status"], entry["attempts"]) == ("timed_out", 2)
    assert entry["error"].startswith("stalled: no output for 1 s"), entry["error"]
    assert entry["stopped_by"] == "stall"
    assert entry["duration_s"] < 30
    assert state.is_failed()
