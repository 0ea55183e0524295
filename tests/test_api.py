"""The Python API (`flows.run_pipeline` and friends) on a real Prefect API and real processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName

import flows
from tests.conftest import count_config_reads, read_timeline, write_config

pytestmark = pytest.mark.usefixtures("prefect_api")


def flow_run_count() -> int:
    with get_client(sync_client=True) as client:
        return len(
            client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["site-pipeline"])), limit=200
            )
        )


def test_run_pipeline_returns_bools_in_list_order_and_records_a_flow_run(tmp_path: Path) -> None:
    """{site: bool} in the order given, a failing site False (no exception), one flow run."""
    config = write_config(tmp_path, ["ignored"])
    before = flow_run_count()
    results = flows.run_pipeline(["ok-z", "fail-a", "ok-m"], config_path=config)
    assert list(results.items()) == [("ok-z", True), ("fail-a", False), ("ok-m", True)]
    assert flow_run_count() == before + 1


def test_use_async_false_is_the_old_one_at_a_time_loop(tmp_path: Path) -> None:
    """use_async=False runs the sites one after another, in order."""
    config = write_config(tmp_path, ["ok-b", "ok-a"], max_concurrent_sites=4)
    assert flows.run_pipeline(config_path=config, use_async=False) == {"ok-b": True, "ok-a": True}
    starts = [site for site, what, _ in read_timeline(tmp_path) if what == "start"]
    assert starts == ["ok-b", "ok-a"]


def test_on_progress_is_called_once_per_site_ending_with_n_n_failed(tmp_path: Path) -> None:
    """on_progress(done, total, failed): one call per site, counting up, last (3, 3, 1)."""
    config = write_config(tmp_path, ["ok-a", "fail-b", "ok-c"])
    calls: list[tuple[int, int, int]] = []
    flows.run_pipeline(config_path=config, on_progress=lambda *c: calls.append(c))
    assert [done for done, _, _ in calls] == [1, 2, 3]
    assert calls[-1] == (3, 3, 1)


def test_run_pipeline_summary_is_the_summary_json(tmp_path: Path) -> None:
    """run_pipeline_summary returns the documented summary dict."""
    config = write_config(tmp_path, ["ok-a"])
    summary = flows.run_pipeline_summary(config_path=config, max_concurrent_sites=1)
    assert summary["state"] == "Completed" and summary["counts"]["succeeded"] == 1
    assert [s["site"] for s in summary["sites"]] == ["ok-a"]


def test_run_pipeline_async_does_not_block_the_event_loop(tmp_path: Path) -> None:
    """Inside asyncio.run, another coroutine keeps ticking while the sites run, and progress
    callbacks arrive on the loop."""
    config = write_config(
        tmp_path,
        ["ok-a", "ok-b"],
        env={"FAKE_TIMELINE": str(tmp_path / "timeline.tsv"), "FAKE_SLEEP": "1.5"},
    )
    progress: list[tuple[int, int, int]] = []

    async def main() -> tuple[dict[str, bool], int, float]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.05)

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        results = await flows.run_pipeline_async(
            config_path=config, on_progress=lambda *c: progress.append(c)
        )
        took = time.monotonic() - started
        stop.set()
        await ticking
        return results, ticks, took

    results, ticks, took = asyncio.run(main())
    assert results == {"ok-a": True, "ok-b": True}
    assert took >= 1.5 and ticks >= took / 0.05 * 0.5  # ticked through the whole run
    assert progress[-1] == (2, 2, 0)


def test_bad_config_raises_config_error_and_runs_nothing(tmp_path: Path) -> None:
    """A bad config or site name raises ConfigError with the CLI's lines; no flow run starts."""
    config = write_config(tmp_path, ["ok-a"], timeout=-5)
    before = flow_run_count()
    with pytest.raises(flows.ConfigError) as bad_config:
        flows.run_pipeline(config_path=config)
    assert "pipeline.timeout = -5" in str(bad_config.value)
    good = write_config(tmp_path, ["ok-a"])
    with pytest.raises(flows.ConfigError) as bad_site:
        flows.run_pipeline(["-rf"], config_path=good)
    assert str(bad_site.value) == (
        "sites[0] = '-rf': must not start with '-' (it would be read as an option)"
    )
    with pytest.raises(flows.ConfigError):
        asyncio.run(flows.run_pipeline_async(["ok-a"], config_path=good, max_concurrent_sites=0))
    assert flow_run_count() == before
    assert not (tmp_path / "timeline.tsv").exists()


def test_a_run_from_the_command_line_reads_its_config_once(
    tmp_path: Path,
    prefect_api: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`site-pipeline run` loads and checks its config once and hands the plan down to the
    flow (`RunContext.plan`): the API and the flow used to read it again (3 reads a run), and
    the metrics' export at the end once more (the plan now carries the config's sites)."""
    from tests.conftest import cli_in_process

    reads = count_config_reads(monkeypatch)
    config = write_config(tmp_path, ["ok-a", "ok-b"], metrics={"textfile": "night.prom"})
    code, _, err = cli_in_process(["run", "--config", str(config)], capsys)
    assert code == 0, err
    assert 'site="ok-b"' in (tmp_path / "night.prom").read_text(encoding="utf-8")
    assert reads == [str(config)]


def test_a_retry_failed_run_reads_its_config_once(
    tmp_path: Path,
    prefect_api: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`run --retry-failed last` reads its config once: the config it starts from (for
    `local_server_idle`) and the earlier run's config are the same file, read once and used
    for both (it used to be read for each, and for the plan)."""
    from tests.conftest import cli_in_process

    config = write_config(tmp_path, ["ok-a", "fail-b"])
    first, _, err = cli_in_process(["run", "--config", str(config)], capsys)
    assert first == 1, err
    reads = count_config_reads(monkeypatch)
    code, out, err = cli_in_process(
        ["run", "--config", str(config), "--retry-failed", "last"], capsys
    )
    assert code == 1, out + err
    assert "running again 1: fail-b" in out, out
    assert reads == [str(config)]
