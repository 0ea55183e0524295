"""A fast CLI: `--help`, `validate` with no server and usage errors import no Prefect, and
`flows.api_url`'s answer to "is an API URL set?" is Prefect's own wherever it gives one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_config
from tests.support.processes import run_tied

PROBE = """
import json, sys
from flows.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit_:
    status = exit_.code
print(json.dumps({"status": status, "prefect": "prefect" in sys.modules}), file=sys.stderr)
"""


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """A user's environment: their own PREFECT_HOME, no Prefect setting of the suite's."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PREFECT_")}
    env.pop("SITE_PIPELINE_CONFIG", None)
    return {**env, "PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["--help"], 0),
        (["run", "--help"], 0),
        (["validate", "--config", "{config}"], 0),
        (["validate", "--config", "{listed}"], 0),
        (["run", "--bogus"], 2),
        (["validate", "--config", "{folder}/missing.yaml"], 2),
    ],
    ids=["help", "run-help", "validate", "validate-listed", "bad-option", "missing-config"],
)
def test_help_validate_and_usage_errors_import_no_prefect(
    tmp_path: Path, argv: list[str], status: int
) -> None:
    """In a fresh interpreter, with no API URL set: each exits as it should and `prefect`
    was never imported (it costs about a second before the first line). `validate` says it
    read no history, not that the sites have none; under `order: listed` history has no say
    and the line names none."""
    config = write_config(tmp_path, ["a.com"], order="longest_first")
    (tmp_path / "listed").mkdir()
    listed = write_config(tmp_path / "listed", ["a.com"], order="listed")
    fill = {"config": str(config), "listed": str(listed), "folder": str(tmp_path)}
    done = run_tied(
        [sys.executable, "-c", PROBE, *(part.format(**fill) for part in argv)],
        env=user_env(tmp_path / "home"),
        cwd=tmp_path,
        timeout=60,
    )
    probe = json.loads(done.stderr.strip().splitlines()[-1])
    assert probe == {"status": status, "prefect": False}, done.stdout + done.stderr
    order_line = {
        "{config}": "order: longest expected first (no PREFECT_API_URL: history not read here; "
        "the run reads it); starts: a.com\n",
        "{listed}": "order: as listed; starts: a.com\n",
    }.get(argv[-1])
    if order_line:
        assert order_line in done.stdout, done.stdout


ASK_BOTH = """
import json
from flows import api_url
ours = api_url.configured()
from prefect.settings import get_current_settings
print(json.dumps([ours, bool(get_current_settings().api.url)]))
"""

URL = "http://127.0.0.1:4999/api"


@pytest.mark.parametrize(
    ("profiles", "extra_env", "dotenv", "ours"),
    [
        (None, {}, None, False),
        (None, {"PREFECT_API_URL": URL}, None, True),
        ({"active": "mine", "profiles": {"mine": {"PREFECT_API_URL": URL}}}, {}, None, True),
        (
            {"active": "mine", "profiles": {"mine": {"PREFECT_LOGGING_LEVEL": "INFO"}}},
            {},
            None,
            False,
        ),
        (
            {"active": "mine", "profiles": {"mine": {}, "other": {"PREFECT_API_URL": URL}}},
            {"PREFECT_PROFILE": "other"},
            None,
            True,
        ),
        ({"active": "local", "profiles": {"local": {}}}, {}, None, None),
        (None, {}, f"PREFECT_API_URL={URL}\n", None),
    ],
    ids=[
        "nothing",
        "env",
        "profile-url",
        "profile-no-url",
        "env-profile",
        "prefects-own",
        "dotenv",
    ],
)
def test_a_certain_answer_is_prefect_s_own(
    tmp_path: Path,
    profiles: dict[str, object] | None,
    extra_env: dict[str, str],
    dotenv: str | None,
    ours: bool | None,
) -> None:
    """Where `flows.api_url.configured()` answers (not None), Prefect's settings say the
    same; where a source could hold what it doesn't read, it leaves the answer to Prefect."""
    home = tmp_path / "home"
    home.mkdir()
    if profiles is not None:
        (home / "profiles.toml").write_text(toml(profiles), encoding="utf-8")
    if dotenv is not None:
        (tmp_path / ".env").write_text(dotenv, encoding="utf-8")
    done = run_tied(
        [sys.executable, "-c", ASK_BOTH],
        env=user_env(home, **extra_env),
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer, prefects = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer == ours
    assert answer is None or answer == prefects


def toml(profiles: dict[str, object]) -> str:
    """A profiles.toml: `active`, then a `[profiles.NAME]` table each."""
    lines = [f'active = "{profiles["active"]}"'] if "active" in profiles else []
    tables = profiles.get("profiles", {})
    assert isinstance(tables, dict)
    for name, settings in tables.items():
        lines.append(f"[profiles.{name}]")
        lines.extend(f'{key} = "{value}"' for key, value in settings.items())
    return "\n".join(lines) + "\n"
