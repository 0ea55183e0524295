"""No false zombies (issue 23): on a real `prefect server start` with its triggers and actions
services, the heartbeat automation that `site-pipeline setup` makes never marks a finished run
Crashed. (That it still marks Crashed a run whose flow process was SIGKILLed mid-run is proved
with a deployment run, a worker and the notification it sends, in
`tests/e2e/test_unattended.py`.)

Prefect's own zombie recipe forces the state change (PrefectHQ/prefect#18653, #21932): a
heartbeat that comes after a run's Completed state opens a new window, no heartbeat follows,
and the forced change overwrites Completed with Crashed. Our automation proposes Crashed
unforced, and Prefect's orchestration refuses to leave a terminal state.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.events import Event
from prefect.events.clients import PrefectEventsClient
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.names import FLOW_NAME
from tests.conftest import PYTHON, ROOT, write_config
from tests.support.processes import run_tied, start_tied, untie
from tests.support.servers import BIN, events_named, prefect_env, prefect_server
from tests.support.waiting import wait_for, wait_until

pytestmark = pytest.mark.slow

# Prefect's shortest heartbeat interval (PREFECT_FLOWS_HEARTBEAT_FREQUENCY >= 30), and a grace
# above it, as `setup` requires: a proactive trigger's `within` may be as short as 10 s, but a
# grace not longer than the interval would crash healthy runs between two heartbeats.
FREQUENCY = 30
GRACE = 40
EVALUATION = 5  # the triggers service looks at proactive triggers every 5 s
# Enough runs to show the rule is not one lucky run; the race it guards against is forced
# below (a heartbeat sent after Completed), not waited for among many runs.
RUNS, PROCESSES = 6, 2
COMPLETING = ROOT / "tests" / "support" / "fakes" / "completing_runs.py"
SITE_PIPELINE = [str(BIN / "site-pipeline")]
HEARTBEAT = "prefect.flow-run.heartbeat"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A real server with `setup`'s automations (grace GRACE s); yields (API URL, the
    environment of a client whose flow runs send heartbeats every FREQUENCY s)."""
    home = tmp_path_factory.mktemp("zombies")
    with prefect_server(home / "server") as api:
        env = prefect_env(home / "client", api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(FREQUENCY))
        config = write_config(home, ["ok-a.com"], concurrency_tag="zombies")
        setup = run_tied(
            [*SITE_PIPELINE, "setup", "--config", str(config), "--heartbeat-grace", str(GRACE)],
            cwd=ROOT,
            env=env,
            timeout=120,
        )
        assert setup.returncode == 0, setup.stdout + setup.stderr
        assert "created automation 'site-pipeline: crash runs whose heartbeats stopped'" in (
            setup.stdout
        )
        yield api, env


def runs_of(client: SyncPrefectClient, config: Path) -> list[FlowRun]:
    """The site-pipeline flow runs made with `config`."""
    runs = client.read_flow_runs(limit=200)
    return [run for run in runs if run.parameters.get("config_path") == str(config)]


def heartbeat_after_completion(api: str, run: FlowRun) -> None:
    """Send the heartbeat a flow run sends (the engine's resource and its flow), now that the
    run is Completed: the race of PrefectHQ/prefect#18653, where the heartbeat thread checked
    the state just before the run completed and emitted just after."""

    async def send() -> None:
        async with PrefectEventsClient(api_url=api) as events:
            await events.emit(
                Event(
                    event="prefect.flow-run.heartbeat",
                    resource={
                        "prefect.resource.id": f"prefect.flow-run.{run.id}",
                        "prefect.resource.name": run.name,
                    },
                    related=[
                        {
                            "prefect.resource.id": f"prefect.flow.{run.flow_id}",
                            "prefect.resource.role": "flow",
                            "prefect.resource.name": FLOW_NAME,
                        }
                    ],
                )
            )

    asyncio.run(send())


def test_completed_runs_are_never_marked_crashed(
    server: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """Flow runs that send heartbeats and complete are all still Completed once the grace
    has passed for every one of them, even the one whose last heartbeat came after its
    Completed state: the automation fires for that one and Prefect turns its change down."""
    api, env = server
    since = datetime.now(UTC) - timedelta(seconds=5)
    config = write_config(tmp_path, ["ok-a.com"], concurrency_tag="zombies")
    procs = [
        start_tied(
            [PYTHON, str(COMPLETING), str(config), str(RUNS // PROCESSES)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    deadline = time.monotonic() + 300
    for proc in procs:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        untie(proc)
        assert proc.returncode == 0, out + err[-3000:]

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = runs_of(client, config)
        assert len(runs) == RUNS
        assert {run.state_name for run in runs} == {"Completed"}
        # Heartbeats were on: events are stored a few seconds after they arrive, and a run
        # that completes before its heartbeat thread's first look sends none (and is safe).
        ids = {f"prefect.flow-run.{run.id}" for run in runs}

        def beating() -> set[str]:
            return ids & {e.resource.id for e in events_named(client, HEARTBEAT, since)}

        wait_for(lambda: beating() == ids, timeout=20, every=1)
        assert len(beating()) >= RUNS // 2, f"only {len(beating())} runs sent one"

        late = runs[0]
        heartbeat_after_completion(api, late)

        def refusals() -> list[Event]:
            return [
                event
                for event in events_named(client, "prefect.automation.action.failed", since)
                if any(str(late.id) in related.id for related in event.related)
            ]

        # The late run's window closes last (GRACE s after its heartbeat), and the service
        # looks every EVALUATION s: once its change is refused, every window has closed.
        refused = wait_until(
            refusals, "the automation fires for the late run", GRACE + 3 * EVALUATION + 60, 1
        )
        after = {run.id: client.read_flow_run(run.id).state for run in runs}

    crashed = {key: state.message for key, state in after.items() if state and state.is_crashed()}
    assert crashed == {}, f"{len(crashed)} completed runs marked Crashed: {crashed}"
    assert {state.name for state in after.values() if state} == {"Completed"}
    assert "terminal state COMPLETED" in str(refused[0].payload.get("reason"))
