"""What a person sees: `site-pipeline run` in a real pseudo-terminal and through a pipe."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path
from uuid import UUID

import pyte
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterTaskRunId,
)
from prefect.logging.handlers import APILogWorker

from tests.conftest import PYTHON, ROOT, cli_env, run_cli, write_config
from tests.support.processes import start_tied

pytestmark = pytest.mark.slow

SITES = ["ok-a", "ok-b", "fail-c", "ok-d", "ok-e", "ok-f"]
ESCAPE = re.compile(r"\x1b[\[\]()]")


def run_piped(args: list[str], api: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["run", *args], cli_env(api))


def task_run_logs(flow_run_id: str, site: str) -> list[str]:
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
        )
        task_run = next(run for run in runs if run.name == site)
        logs = client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run.id]))
        )
    return [log.message for log in logs]


def test_a_terminal_shows_the_live_view_then_a_table_and_one_line_per_failure(
    tmp_path: Path, prefect_api: str
) -> None:
    """In a 160-column pseudo-terminal, 6 sites with one failing: while sites run, the screen
    shows the progress bar and the running sites; at the end, the table and the count line.
    The failing site is one log line; no traceback; no progress text glued to a log line."""
    config = write_config(tmp_path, SITES, max_concurrent_sites=2, env={"FAKE_SLEEP": "1.5"})
    screen = pyte.Screen(160, 400)
    stream = pyte.ByteStream(screen)
    controller, terminal = pty.openpty()
    env = {**cli_env(prefect_api), "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "400"}
    env.pop("NO_COLOR", None)
    proc = start_tied(
        [PYTHON, "-m", "flows", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    raw = bytearray()
    live_seen = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            raw += chunk
            stream.feed(chunk)
            shown = "\n".join(screen.display)
            live_seen = live_seen or ("ETA" in shown and "running:" in shown)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(controller)
    lines = [line.rstrip() for line in screen.display if line.strip()]
    text = raw.decode("utf-8", "replace")
    assert proc.returncode == 1, "\n".join(lines[-40:])
    assert live_seen, "the live view never showed"
    assert "Traceback" not in text
    failure_lines = [line for line in lines if "fail-c" in line and "attempt 1/1 failed" in line]
    assert len(failure_lines) == 1, lines
    assert "exit code 1: fail-c: boom on attempt 1; no retries left" in failure_lines[0]
    assert any(line.startswith("Failed: 5/6 succeeded") for line in lines)
    assert any(re.match(r"\s*site\s+.*status", line) for line in lines)  # the table's header
    for line in lines:  # no line holds both a log record and progress text
        assert not (" | " in line and "ETA" in line), line


def test_through_a_pipe_plain_lines_lifecycle_only_and_the_ui_link(
    tmp_path: Path, prefect_api: str
) -> None:
    """Not a terminal: no escape codes. The default shows the lifecycle but not the pipeline's
    own lines (the UI's logs keep them, and no traceback); then the UI link and the summary
    path."""
    config = write_config(tmp_path, ["ok-a", "fail-b"])
    summary_path = tmp_path / "summary.json"
    result = run_piped(["--config", str(config), "--summary-json", str(summary_path)], prefect_api)
    assert result.returncode == 1, result.stderr[-3000:]
    assert not ESCAPE.search(result.stdout) and not ESCAPE.search(result.stderr)
    assert "[stderr]" not in result.stderr  # the pipeline's own lines are not printed...
    assert "attempt 1/1 started" in result.stderr
    cause = "attempt 1/1 failed: exit code 1: fail-b: boom on attempt 1; no retries left"
    assert cause in result.stderr  # ...but the lifecycle line says why it failed
    assert "Traceback" not in result.stderr
    flow_run_id = json.loads(summary_path.read_text())["flow_run_id"]
    assert f"/runs/flow-run/{flow_run_id}" in result.stdout
    assert f"summary: {summary_path}" in result.stdout
    logs = task_run_logs(flow_run_id, "fail-b")
    assert any("fail-b: boom on attempt 1" in message for message in logs)
    assert not any("Traceback" in message for message in logs)


def test_verbose_shows_the_pipeline_lines_and_quiet_only_problems(
    tmp_path: Path, prefect_api: str
) -> None:
    """-v prints the pipeline's own lines too; -q prints no lifecycle, only the failure."""
    config = write_config(tmp_path, ["ok-a", "fail-b"])
    verbose = run_piped(["--config", str(config), "-v"], prefect_api)
    assert "fail-b: boom on attempt 1" in verbose.stderr
    quiet = run_piped(["--config", str(config), "-q"], prefect_api)
    assert "started" not in quiet.stderr
    assert "attempt 1/1 failed: exit code 1: fail-b: boom on attempt 1; no retries left" in (
        quiet.stderr
    )
    assert "Failed: 1/2 succeeded" in quiet.stdout


@pytest.mark.parametrize("flags", [["-v", "-q"]])
def test_verbose_and_quiet_together_are_a_usage_error(flags: list[str], prefect_api: str) -> None:
    """-v and -q contradict each other: exit 2."""
    result = run_piped(flags, prefect_api)
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
