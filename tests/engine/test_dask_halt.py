"""Halt on Dask workers: task runs in other processes still hear of the flow's halt (the
flow run's halt label), so sites not yet started there don't start, and `when: now` stops the
pipelines running on the workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import read_timeline, write_config
from tests.support.processes import hanging_pids, wait_until_gone

pytest.importorskip(
    "prefect_dask", reason='prefect-dask is not installed: pip install -e ".[dask]"'
)

from flows.site_pipeline import run_sites

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]

DASK = {"kind": "dask", "n_workers": 2}


def run(config: Path) -> tuple[Any, dict[str, dict[str, Any]]]:
    state = run_sites(config_path=str(config), return_state=True)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), f"flow ended {state.name}: {state.message}"
    return state, {entry["site"]: entry for entry in summary["sites"]}


def test_a_halt_on_dask_starts_no_more_sites_on_the_workers(tmp_path: Path) -> None:
    """10 failing sites at cap 2 on 2 workers, halt failed: 2 (soon): most sites never start,
    and those end cancelled with the halt's reason; the run ends Failed, naming the halt."""
    sites = [f"fail-{i:02d}" for i in range(10)]
    config = write_config(
        tmp_path,
        sites,
        max_concurrent_sites=2,
        halt={"failed": 2},
        task_runner=DASK,
        env={"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_SLEEP": "1"},
    )
    state, reports = run(config)
    ran = {site for site, what, _ in read_timeline(tmp_path) if what == "start"}
    assert 2 <= len(ran) <= 5, ran
    for site in set(sites) - ran:
        assert reports[site]["status"] == "cancelled", reports[site]
        assert reports[site]["error"] == "the run halted after 2 failures (halt: 2 failed)"
    assert state.is_failed() and state.message.startswith("the run halted after 2 failures")


def test_halt_now_on_dask_stops_the_pipeline_running_on_a_worker(tmp_path: Path) -> None:
    """when: now on Dask: a hanging site running on a worker when another fails is stopped
    (pipeline and grandchild gone) and ends cancelled with the halt's reason."""
    config = write_config(
        tmp_path,
        ["fail-a", "hang-b"],
        max_concurrent_sites=2,
        halt={"failed": 1, "when": "now"},
        task_runner=DASK,
        env={
            "FAKE_TIMELINE": str(tmp_path / "timeline.tsv"),
            "FAKE_PIDS_DIR": str(tmp_path),
            "FAKE_WAIT_FOR": "hang-b",  # fail-a fails only once hang-b surely runs
            "FAKE_SLEEP": "0.3",
        },
    )
    state, reports = run(config)
    assert reports["fail-a"]["status"] == "failed"
    assert reports["hang-b"]["status"] == "cancelled", reports["hang-b"]
    assert reports["hang-b"]["error"] == "the run halted after 1 failure (halt: 1 failed)"
    assert wait_until_gone(hanging_pids(tmp_path, 1, timeout=1)) == []
    assert state.is_failed()
