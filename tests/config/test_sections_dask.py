"""`pipeline.task_runner.worker_wait` (issue 43): validated like the other task_runner keys.
A bad value makes `validate` and `run` exit 2, naming the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import parse_config
from tests.conftest import cli_in_process

KEY = "pipeline.task_runner.worker_wait"
BAD = [
    ("zero", "{kind: dask, worker_wait: 0}", f"{KEY} = 0: expected greater than 0"),
    ("negative", "{kind: dask, worker_wait: -5}", f"{KEY} = -5: expected greater than 0"),
    ("a word", "{kind: dask, worker_wait: soon}", f"{KEY} = 'soon': expected a valid number"),
    ("a bool", "{kind: dask, worker_wait: true}", f"{KEY} = True: expected a valid number"),
    ("threads", "{worker_wait: 30}", f"{KEY} = 30: only for kind dask"),
]


@pytest.mark.parametrize(("case", "runner", "expected"), BAD, ids=[c[0] for c in BAD])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_bad_worker_wait_exits_2_and_names_the_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    runner: str,
    expected: str,
    command: str,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"pipeline:\n  sites: [a]\n  task_runner: {runner}\n", encoding="utf-8")
    code, _, err = cli_in_process([command, "--config", str(config)], capsys)
    assert code == 2, err
    assert expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "output").exists()  # nothing half-ran


def test_worker_wait_is_300_s_unless_set_and_takes_seconds() -> None:
    def wait(runner: str) -> float:
        text = f"pipeline:\n  sites: [a]\n  task_runner: {runner}\n"
        return parse_config(text).task_runner.worker_wait

    assert wait("{kind: dask}") == 300
    assert wait("{kind: dask, address: 'tcp://h:8786', worker_wait: 2.5}") == 2.5
    assert wait("{kind: threads}") == 300  # unused there, and not an error when not set
