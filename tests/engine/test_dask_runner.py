"""`flows.engine.dask_runner.SharedContextDaskRunner` on a real local Dask cluster and the
session's Prefect API: a task run on a worker runs in its flow run's context, sent once per
flow run; upstream results, `wait_for` and async tasks work as on prefect-dask's path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest

pytest.importorskip(
    "prefect_dask", reason='prefect-dask is not installed: pip install -e ".[dask]"'
)

import distributed
from prefect import flow, tags, task
from prefect.client.orchestration import get_client
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings, temporary_settings

from flows.engine import dask_runner
from flows.engine.dask_runner import SharedContextDaskRunner
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One worker process with two threads: every task run lands on the same worker."""
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None
    ) as local:
        yield local.scheduler_address


KEPT: list[object] = []  # on the worker: every client a probe saw stays alive (ids unique)


@task(tags=["probe"])
def probe(n: int) -> dict[str, Any]:
    context = TaskRunContext.get()
    assert context is not None
    KEPT.append(get_client(sync_client=True))
    return {
        "n": n,
        "pid": os.getpid(),
        "flow_run_id": str(flow_run.get_id()),
        "task_run_id": str(context.task_run.id),
        "tags": sorted(context.task_run.tags),
        "max_retries": get_current_settings().client.max_retries,
        "client": id(get_client(sync_client=True)),
    }


@task
def number(n: int) -> int:
    return n


@task
def plus_one(value: int) -> int:
    return value + 1


@task
async def later() -> str:
    return "async"


def test_task_runs_on_a_worker_run_in_their_flow_runs_context_sent_once(
    cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four task runs (two submitted as the site flow does, with empty dependencies, two by
    `Task.submit`) run on the worker process, each as its own task run of the flow run, with
    the flow's tags and the settings the flow set (none of which the worker's environment
    has), and one Prefect client for the worker. The flow run's context is serialized once,
    not once per task run."""
    serialized: list[int] = []
    original = dask_runner.serialize_context

    def counting() -> dict[str, Any]:
        serialized.append(1)
        return original()

    monkeypatch.setattr(dask_runner, "serialize_context", counting)

    @flow(task_runner=SharedContextDaskRunner(address=cluster))
    def probes() -> tuple[str, list[tuple[str, dict[str, Any]]]]:
        from prefect.context import FlowRunContext

        runner = FlowRunContext.get().task_runner  # type: ignore[union-attr]
        with tags("nightly"), temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 7}):
            futures = [runner.submit(probe, {"n": n}, dependencies={}) for n in (0, 1)]
            futures += [probe.submit(n) for n in (2, 3)]
        return str(flow_run.get_id()), [(str(f.task_run_id), f.result()) for f in futures]

    flow_run_id, results = probes()

    assert serialized == [1]
    assert [r["n"] for _, r in results] == [0, 1, 2, 3]
    assert {r["pid"] for _, r in results} != {os.getpid()}
    assert len({r["pid"] for _, r in results}) == 1
    assert all(r["task_run_id"] == submitted for submitted, r in results)
    assert len({submitted for submitted, _ in results}) == 4
    assert {r["flow_run_id"] for _, r in results} == {flow_run_id}
    assert all(r["tags"] == ["nightly", "probe"] for _, r in results)
    assert {r["max_retries"] for _, r in results} == {7}
    assert len({r["client"] for _, r in results}) == 1
    with get_client(sync_client=True) as client:

        def recorded() -> list[Any]:
            return [client.read_task_run(UUID(submitted)) for submitted, _ in results]

        # A worker's task run reports its states as events, which the server records a moment
        # later: wait for every Completed state to be recorded (a CI run read one too early).
        wait_until(
            lambda: all(r.state is not None and r.state.is_completed() for r in recorded()),
            "every task run's Completed state recorded",
            30,
        )
        runs = recorded()
    assert all(run.flow_run_id == UUID(flow_run_id) for run in runs)
    assert all(run.state is not None and run.state.is_completed() for run in runs)


def test_upstream_results_wait_for_and_async_tasks_run_as_on_prefect_dask(cluster: str) -> None:
    """An upstream future as a parameter arrives as its result and is recorded as the task
    run's input; a task that waits for another starts after it ends; an async task runs."""

    @flow(task_runner=SharedContextDaskRunner(address=cluster))
    def chain() -> tuple[int, str, list[str]]:
        first = number.submit(2)
        second = plus_one.submit(first)
        third = later.submit(wait_for=[second])
        ids = [str(f.task_run_id) for f in (first, second, third)]
        return second.result(), third.result(), ids

    total, text, ids = chain()

    assert (total, text) == (3, "async")
    with get_client(sync_client=True) as client:
        first, second, third = (client.read_task_run(UUID(i)) for i in ids)
    assert [getattr(i, "id", None) for i in second.task_inputs["value"]] == [first.id]
    assert second.end_time is not None and third.start_time is not None
    assert third.start_time >= second.end_time


def test_a_submit_from_inside_a_task_run_takes_prefect_dask_s_own_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inside a task run the context differs from one submit to the next: such a submit
    goes to prefect-dask's `submit` with its arguments as given."""
    taken: list[tuple[Any, ...]] = []

    def prefect_dask_submit(self: Any, *args: Any) -> str:
        taken.append(args)
        return "prefect-dask's"

    monkeypatch.setattr(dask_runner.DaskTaskRunner, "submit", prefect_dask_submit)
    monkeypatch.setattr(dask_runner.TaskRunContext, "get", classmethod(lambda cls: object()))
    runner = SharedContextDaskRunner(address="tcp://127.0.0.1:1")

    assert runner.submit(number, {"n": 1}, None, {}) == "prefect-dask's"
    assert taken == [(number, {"n": 1}, None, {})]


def test_a_shared_context_the_workers_lost_is_sent_again(cluster: str) -> None:
    """Scattered data lives only on the workers: when it is gone (here cancelled, as when
    every worker restarts), the next submit sends the context again and its task run runs
    in the flow run as before."""

    @flow(task_runner=SharedContextDaskRunner(address=cluster))
    def twice() -> tuple[str, list[str]]:
        from prefect.context import FlowRunContext

        runner = FlowRunContext.get().task_runner  # type: ignore[union-attr]
        first = runner.submit(probe, {"n": 1}, dependencies={})
        first.wait()
        runner.client.cancel([runner._shared, *(f for _, f in runner._tasks.values())])
        second = runner.submit(probe, {"n": 2}, dependencies={})
        return str(flow_run.get_id()), [r.result()["flow_run_id"] for r in (first, second)]

    flow_run_id, seen = twice()

    assert seen == [flow_run_id, flow_run_id]
