"""A first run without noise: the local Prefect server that `site-pipeline` starts (no
PREFECT_API_URL; `local_server_idle: 0`, so it stops with the run) writes its own log to
`$PREFECT_HOME/logs/local-server.log`, never to the user's terminal; a server that fails to
start, or does not answer in time, is one error with that log's path (and its last lines),
exit status 1, no traceback. Prefect's telemetry stays as shipped: these runs do not switch
it off."""

from __future__ import annotations

import io
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from flows.ops import server
from tests.conftest import ROOT, run_cli, write_config
from tests.support.processes import keepers_under
from tests.support.servers import seed_home

# What Prefect's server says when it reaches a terminal: its loggers, uvicorn, a traceback.
SERVER_NOISE = re.compile(r"prefect\.server|telemetry|uvicorn|docket|Traceback|sqlite3\.")


def first_run_env(home: Path, fresh: bool = False, **extra: str) -> dict[str, str]:
    """A new user's environment: a new PREFECT_HOME, no PREFECT_API_URL, and none of the
    suite's switches (PREFECT_SERVER_ANALYTICS_ENABLED=false, DO_NOT_TRACK): telemetry as
    Prefect ships it. Its database is already migrated (`tests.support.servers.seed_home`) unless
    `fresh`: only a first run's test pays for the migrations."""
    if not fresh:
        seed_home(home)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_") and key not in {"DO_NOT_TRACK", "SITE_PIPELINE_CONFIG"}
    }
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(ROOT), **extra)
    return env


def console(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


@pytest.mark.slow  # a CLI process with its own local server
def test_a_first_run_shows_nothing_from_prefect_s_server_and_logs_it_under_prefect_home(
    tmp_path: Path,
) -> None:
    """The issue's "done when": the real CLI on the embedded default with telemetry as
    shipped: exit 0, no line from Prefect's server on stdout or stderr (no `prefect.server`,
    no telemetry, no traceback), and the server's log in `$PREFECT_HOME/logs`, holding what
    the server said (at DEBUG, its telemetry service always says something)."""
    home = tmp_path / "home"
    config = write_config(tmp_path, ["ok-a", "ok-b"])
    env = first_run_env(home, fresh=True, PREFECT_LOGGING_SERVER_LEVEL="DEBUG")
    result = run_cli(["run", "--config", str(config)], env)
    out = console(result)
    assert result.returncode == 0, out[-3000:]
    assert "Completed: 2/2 succeeded" in result.stdout
    assert [line for line in out.splitlines() if SERVER_NOISE.search(line)] == []
    log = home / "logs" / "local-server.log"
    assert log.is_file()
    assert "prefect.server.services.telemetry" in log.read_text(errors="replace")


@pytest.mark.slow  # a CLI process whose local server fails to start
def test_a_server_that_cannot_start_says_why_with_its_log_tail_and_path(tmp_path: Path) -> None:
    """A database the server can't open: the server exits, and its keeper with it; the run
    prints one error line that names the log, then the log's last lines (the database
    error, no traceback frames), and exits 1 with no traceback of our own, at once (not
    after the 600 s start-up wait); no site ran, and no keeper is left."""
    home = tmp_path / "home"
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    config = write_config(tmp_path, ["ok-a"])
    env = first_run_env(
        home,
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{not_a_folder}/prefect.db",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600",
    )
    began = time.monotonic()
    result = run_cli(["run", "--config", str(config)], env, timeout=400)
    out = console(result)
    assert result.returncode == 1, out[-3000:]
    log = home / "logs" / "local-server.log"
    errors = [
        line for line in result.stderr.splitlines() if line.startswith("site-pipeline: error")
    ]
    assert errors == [
        "site-pipeline: error: the local Prefect server exited before it answered; "
        f"its log: {log}; its last lines:"
    ], out[-3000:]
    assert "  sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) unable to open " in out
    assert "Traceback" not in out and '  File "' not in out
    assert not (tmp_path / "timeline.tsv").exists()
    assert time.monotonic() - began < 300  # not the 600 s wait
    assert keepers_under(home) == []


@pytest.mark.slow  # a CLI process with its own local server
def test_a_server_that_does_not_answer_in_time_is_one_line_naming_the_setting(
    tmp_path: Path,
) -> None:
    """PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=1 (the user's own setting, kept as
    given): one error line that says what happened, names the setting and the log, exit 1,
    no traceback (not Prefect's bare `RuntimeError: Timed out...`)."""
    home = tmp_path / "home"
    config = write_config(tmp_path, ["ok-a"])
    env = first_run_env(home, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    result = run_cli(["run", "--config", str(config)], env)
    out = console(result)
    assert result.returncode == 1, out[-3000:]
    log = home / "logs" / "local-server.log"
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors[0].startswith(
        "site-pipeline: error: the local Prefect server did not answer within 1 s; its log: "
        f"{log}; to wait longer, set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (e.g. 120)"
    ), out[-3000:]
    assert errors[1:] == [], out[-3000:]
    assert "Traceback" not in out and "RuntimeError" not in out
    assert not (tmp_path / "timeline.tsv").exists()


def test_the_wait_is_60_s_unless_the_user_set_prefect_s_setting() -> None:
    """Unset, the wait is `STARTUP_TIMEOUT` (60 s, not Prefect's 20); set, even to Prefect's
    own default, the user's value is kept."""
    assert server.STARTUP_TIMEOUT == 60
    assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() == 20  # Prefect's default
    assert server.startup_timeout() == 60
    for seconds in (5, 20, 300):
        with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: seconds}):
            assert server.startup_timeout() == seconds


def test_the_log_tail_keeps_what_the_server_said_not_its_traceback_frames() -> None:
    """The tail drops blank lines, traceback headers and frames (indented), strips ANSI
    escapes, keeps a line that each restart said again once (its last time, whatever its
    clock), and keeps the last `lines`."""
    said = (
        "00:00:01.000 | ERROR   | uvicorn.error - Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "    boom()\n"
        "    ^^^^^^\n"
        "OSError: disk on fire\n"
        "\n"
        "The above exception was the direct cause of the following exception:\n"
        "\x1b[31mRuntimeError: it broke\x1b[0m\n"
        "00:00:01.500 | ERROR   | uvicorn.error - Application startup failed. Exiting.\n"
        "OSError: disk on fire\n"
        "00:00:09.250 | ERROR   | uvicorn.error - Application startup failed. Exiting.\n"
    )
    log = io.BytesIO(said.encode())
    assert server.log_tail(log) == [
        "RuntimeError: it broke",
        "OSError: disk on fire",
        "00:00:09.250 | ERROR   | uvicorn.error - Application startup failed. Exiting.",
    ]
    assert server.log_tail(log, lines=1) == [
        "00:00:09.250 | ERROR   | uvicorn.error - Application startup failed. Exiting."
    ]
    long = io.BytesIO(b"x" * 1000 + b"\n\xff\xfe bad utf-8\n")
    assert server.log_tail(long) == ["x" * 300, "\ufffd\ufffd bad utf-8"]
