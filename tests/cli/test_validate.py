"""`site-pipeline validate`: what a run would do, shown and checked, and nothing started
(its start order against the run's: engine/test_prepare_site_settings.py; its memory line:
engine/test_attempt_engine_memory.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_in_process, write_config


def test_validate_prints_the_first_argv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`validate` exits 0 and shows exactly what the first site would run."""
    config = write_config(tmp_path, ["first.com", "second.com"])
    code, out, _ = cli_in_process(["validate", "--config", str(config)], capsys)
    assert code == 0
    argv_line = next(line for line in out.splitlines() if line.startswith("first site's argv: "))
    argv = json.loads(argv_line.split(": ", 1)[1])
    assert argv[2:] == ["--site", "first.com", "--attempt", "1"]


def test_validate_takes_site_and_sites_file_like_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate --site S` and `validate --sites-file F` show those sites, as `run` would run
    them; a bad `--site` is exit 2, naming it."""
    config = write_config(tmp_path, ["configured.com"])
    code, out, _ = cli_in_process(
        ["validate", "--config", str(config), "--site", "given.com"], capsys
    )
    assert code == 0 and "sites: 1 (given.com)" in out, out
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbffrom-file.com\r\nnext.com\r\n")
    code, out, _ = cli_in_process(
        ["validate", "--config", str(config), "--sites-file", str(tmp_path / "list.txt")], capsys
    )
    assert code == 0 and "sites: 2 (from-file.com, next.com)" in out, out
    code, _, err = cli_in_process(["validate", "--config", str(config), "--site=-rf"], capsys)
    assert code == 2 and "--site[0] = '-rf'" in err, err


def test_validate_shows_the_stall_halt_and_error_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate` says what stops an attempt or the run early."""
    config = write_config(
        tmp_path, ["a"], stall_timeout=120, halt={"failed": "30%", "min_done": 10}
    )
    code, out, _ = cli_in_process(["validate", "--config", str(config)], capsys)
    assert code == 0
    assert "stops: stall after 120s; halt: 30% failed (of at least 10 done) (soon); 4 " in out
