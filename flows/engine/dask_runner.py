"""A Dask task runner that sends what every task run shares once, not once per site.

`prefect_dask.DaskTaskRunner` (read from prefect-dask 0.3.7 on Prefect 3.9.1) does this for
each `submit`:
- `prefect.context.serialize_context()`: the settings (hundreds of fields walked one by
  one, secrets rendered), the flow run, the flow and its parameters: about 100 ms here;
- Dask's `tokenize` of every argument (that whole context again) to name the task: ~15 ms;
- cloudpickle of a new closure over the task, the task and its function by value: ~10 ms.
All of it is the same for every site of a flow run. So here, at the first submit of a
flow run, the shared context (all of `serialize_context()` but the task run's own asset
context) and each distinct task are sent to the cluster once (to every worker there is;
with none yet, as a task of its own that returns it: a dependency future, as
prefect-dask's open PR #23024 does), and each submit sends Dask a module-level function
(pickled by name), those two futures, the task run's id, its small asset context and its
parameters, under a key of its own (no `tokenize`).
On the worker, `_run_on_worker` calls Prefect's `run_task_sync` with the same `context`
dict, as prefect-dask's own wrapper does, but for two things each task run would build
again there (a third and a half of a short site's CPU on a worker, by py-spy):
- the settings: `hydrated_context` validates them from their serialized form (the profiles
  file, `.env` and the environment read again: about 36 ms); here they travel as the flow's
  `SettingsContext` object itself, unpickled once per worker, entered (a copy) per run;
- the Prefect client: two new sync clients per task run (about 22 ms each); here one per
  worker, made at its first task run and shared by its threads
  (`flows._prefect_compat.shared_sync_client`), as Prefect's thread runner shares the flow's.
Both are held by the `Shared` object, which Dask keeps once per worker while the flow run
lasts: nothing is global to the worker process.

Why both ways. A broadcast `scatter` needs workers there and then, and a cluster that scales
from zero (`adapt(minimum=0)`: dask-jobqueue's, dask-kubernetes') has none until tasks wait
for them: Dask's scheduler fails it ("No valid workers found"). A dependency task waits with
the task runs: the first worker to come computes it, and any other worker that gets a task
run fetches it from one that has it (once per worker). But Dask sends a task run only to a
worker that already holds its dependencies (others get work only by stealing): with a copy
on one worker of two, 6 one-second tasks on 2 x 2 threads went 4 and 2 (2.1-3.3 s), against
3 and 3 (2.0-2.3 s) with a copy on each. So a copy goes to every worker there is, and only a
cluster with no worker gets the dependency task, as does one whose workers leave while the
copies go (an adaptive cluster retires an idle worker within seconds). The scheduler keeps
that task (its pickled value, a few kB) while the flow run holds its future, so a copy lost
with its workers is computed again; a lost scattered copy, or a cancelled or failed one, is
sent again by the next submit.

`wait_for_workers`, called once as the run starts (`flows.engine.task_runners`): on a
cluster with no worker, a probe task asks an adaptive cluster for one, and the run waits
for it for `task_runner.worker_wait`, else fails naming the address and the wait.

Everything else is prefect-dask's: the upstream task runs found in the parameters (when the
caller states no `dependencies`, as `Task.submit` doesn't), `wait_for`, async tasks, the
`PrefectDaskFuture`. Only a submit from inside a task run (a nested task) goes to
prefect-dask's own `submit`: its context differs from one call to the next.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast
from uuid import UUID, uuid4

import distributed
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.context import AssetContext, SettingsContext, TaskRunContext, serialize_context
from prefect.task_engine import run_task_async, run_task_sync
from prefect.tasks import Task
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect_dask.task_runners import DaskTaskRunner, PrefectDaskFuture

from flows._prefect_compat import shared_sync_client
from flows.dask_cluster import WorkerWaitEnded


class Shared:
    """What every task run of a flow run shares: the flow's settings and the rest of its
    serialized context; pickled (and so sent) without the worker's client."""

    def __init__(self, settings: SettingsContext, context: dict[str, Any]) -> None:
        self.settings = settings
        self.context = context  # `serialize_context()` but for the settings and assets
        self._client: SyncPrefectClient | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "context": self.context}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"], state["context"])  # type: ignore[misc]

    @contextmanager
    def entered(self) -> Iterator[None]:
        """The flow's settings and this worker's client are this thread's, for one run."""
        with self.settings.model_copy(), shared_sync_client(self._worker_client()):
            yield

    def _worker_client(self) -> SyncPrefectClient:
        with self._lock:
            if self._client is None:  # this worker's first task run of the flow run
                client = get_client(sync_client=True)  # under the flow's settings
                client.__enter__()
                weakref.finalize(self, client.__exit__, None, None, None)
                self._client = client
            return self._client


def _run_on_worker(
    task: Task[..., Any],
    shared: Shared,
    asset_context: dict[str, Any],
    task_run_id: UUID,
    parameters: dict[str, Any],
    wait_for: list[Any] | None,
    dependencies: dict[str, set[Any]],
) -> Any:
    """The task run, on a Dask worker: prefect-dask's wrapper, with the shared context."""
    kwargs: dict[str, Any] = dict(
        task=task,
        task_run_id=task_run_id,
        parameters=parameters,
        wait_for=wait_for,
        return_type="state",
        dependencies=dependencies,
        context={**shared.context, "asset_context": asset_context},
    )
    with shared.entered():
        if task.isasync:
            return asyncio.run(run_task_async(**kwargs))
        return run_task_sync(**kwargs)


WORKER_POLL = 0.5
"""Seconds between two looks for a worker while waiting (and for a stop request)."""


def _ready() -> None:
    """The probe: a task that an adaptive cluster with no worker scales up for."""


def _held(value: Any) -> Any:
    """On a worker: `value`, which the task runs depending on this task share."""
    return value


class SharedContextDaskRunner(DaskTaskRunner):
    """`DaskTaskRunner` whose `submit` sends the flow run's shared context and each task
    once (see the module's docstring); everything else is prefect-dask's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shared: distributed.Future[Any] | None = None
        self._tasks: dict[int, tuple[Task[..., Any], distributed.Future[Any]]] = {}

    def __exit__(self, *args: Any) -> None:
        self._shared = None  # what was sent is released with its futures
        self._tasks = {}
        super().__exit__(*args)

    def wait_for_workers(
        self,
        wait: float,
        stopped: Callable[[], bool] = lambda: False,
        say: Callable[[str], None] | None = None,
    ) -> None:
        """Return once the cluster has a running worker; on one with none, submit a probe
        task (an adaptive cluster scales up for it) and wait up to `wait` seconds for one,
        telling `say` (the flow run's log; else this runner's) that it waits, and how long
        it took. Raises `WorkerWaitEnded` when none came in time, or once `stopped()`."""
        client = self.client
        if _has_worker(client, 0.01):
            return
        say = say or self.logger.info
        address = client.scheduler.address  # type: ignore[union-attr]
        say(
            f"no Dask worker at {address} yet: waiting up to {wait:g} s "
            "(task_runner.worker_wait) for one"
        )
        started = time.monotonic()
        probe = client.submit(  # type: ignore[no-untyped-call]
            _ready, key=f"site-pipeline-worker-probe-{uuid4().hex}", pure=False
        )
        try:
            while not _has_worker(client, WORKER_POLL):
                if stopped():
                    raise WorkerWaitEnded(f"stopped while waiting for a Dask worker at {address}")
                if time.monotonic() - started >= wait:
                    raise WorkerWaitEnded(
                        f"no Dask worker at {address} within task_runner.worker_wait = {wait:g} s"
                    )
        finally:
            probe.release()
        took = time.monotonic() - started
        say(f"a Dask worker at {address} came after {took:.1f} s")

    def submit(  # type: ignore[override]  # prefect-dask's overloads, one signature here
        self,
        task: Task[..., Any],
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectDaskFuture[Any]] | None = None,
        dependencies: dict[str, set[Any]] | None = None,
    ) -> PrefectDaskFuture[Any]:
        settings = SettingsContext.get()
        if TaskRunContext.get() is not None or settings is None:  # a nested task (its own
            # context each call), or no settings context yet (Prefect still loading)
            return super().submit(task, parameters, wait_for, dependencies)
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        client = self.client
        parameters = self._optimize_futures(parameters)  # PrefectDaskFuture -> Dask's own
        waits = list(self._optimize_futures(wait_for)) if wait_for else None
        if dependencies is None:  # as prefect-dask's client: the upstream runs in parameters
            dependencies = {
                name: collect_task_run_inputs_sync(value, future_cls=distributed.Future)
                for name, value in parameters.items()
            }
        task_run_id = uuid4()
        asset_context = AssetContext.from_task_and_inputs(
            task=task, task_run_id=task_run_id, task_inputs=dependencies, copy_to_child_ctx=True
        ).serialize()
        future = client.submit(  # type: ignore[no-untyped-call]
            _run_on_worker,
            self._sent_task(client, task),
            self._shared_context(client, settings),
            asset_context,
            task_run_id,
            parameters,
            waits,
            dependencies,
            key=f"{task.name}-{task_run_id.hex}",
            pure=False,
        )
        return PrefectDaskFuture[Any](wrapped_future=future, task_run_id=task_run_id)

    def _shared_context(
        self, client: distributed.Client, settings: SettingsContext
    ) -> distributed.Future[Any]:
        if self._shared is None or _gone(self._shared):  # none yet, or cancelled
            context = serialize_context()
            del context["settings_context"], context["asset_context"]  # sent as objects
            # A new context of the same fields: the entered one holds its (unpicklable) token.
            unentered = SettingsContext.model_construct(**dict(settings))
            self._shared = _send(client, Shared(unentered, context), "shared-context")
        return self._shared

    def _sent_task(
        self, client: distributed.Client, task: Task[..., Any]
    ) -> distributed.Future[Any]:
        held = self._tasks.get(id(task))
        if held is None or held[0] is not task or _gone(held[1]):
            held = (task, _send(client, task, f"task-{task.name}"))
            self._tasks[id(task)] = held
        return held[1]


def _send(client: distributed.Client, value: Any, name: str) -> distributed.Future[Any]:
    """`value`, sent once (see the module's docstring): to every worker there is; with
    none, as a task that returns it, which waits for a worker as the task runs do."""
    if client.scheduler_info(n_workers=1)["workers"]:
        try:
            [future] = client.scatter(  # type: ignore[no-untyped-call]
                [value], broadcast=True, hash=False
            )  # a list of one: `scatter` would split a dict
            return cast("distributed.Future[Any]", future)
        except OSError:  # they left meanwhile (an adaptive cluster scaled down): Dask's
            pass  # TimeoutError, or CommClosedError from the one that was closing
    return client.submit(_held, value, key=f"site-pipeline-{name}-{uuid4().hex}", pure=False)


def _gone(future: distributed.Future[Any]) -> bool:
    """Whether the cluster will never give `future`'s value (cancelled, failed, lost); one
    still pending (no worker yet) or finished is there for the task runs that need it."""
    return future.status not in ("pending", "finished")


def _has_worker(client: distributed.Client, timeout: float) -> bool:
    """Whether the cluster has a running worker, or gets one within `timeout` seconds."""
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        return False
    return True
