"""What each `run_site` task run carries (`SiteJob.for_site`) and how the flow collects the
task runs as they end (`sites_as_they_end`): plain Python, no Prefect server.

On Dask both decide the flow process's memory: the scheduler keeps every task's parameters
(unpickled) while the flow holds its future (`bench/soak.py`, BENCHMARKS.md)."""

from __future__ import annotations

import concurrent.futures
import gc
import pickle
import weakref
from pathlib import Path
from typing import Any
from uuid import uuid4

from prefect.futures import PrefectConcurrentFuture

from flows.config import load_plan
from flows.engine.site_job import SiteJob
from flows.engine.submission import sites_as_they_end
from flows.timeouts import SiteTimeout
from tests.conftest import write_config


def job_of(folder: Path, count: int) -> SiteJob:
    """A job over `count` sites (s0000, s0001, ...), s0001 with an entry of its own, each
    with a timeout and a result-check history."""
    folder.mkdir(parents=True, exist_ok=True)
    sites: list[Any] = [f"s{i:04d}" for i in range(count)]
    sites[1] = {"site": "s0001", "timeout": 7, "retry_count": 3}
    plan = load_plan(write_config(folder, sites))
    names = [f"s{i:04d}" for i in range(count)]
    return SiteJob(
        plan,
        uuid4(),
        ("t",),
        {name: [float(i)] for i, name in enumerate(names)},
        {name: SiteTimeout(60.0 + i, f"timeout {60 + i} s") for i, name in enumerate(names)},
    )


def test_a_task_run_carries_only_its_own_site_s_share_of_the_job(tmp_path: Path) -> None:
    """`for_site`: the plan with only that site (its own entry and its resolved settings),
    its own timeout and check history, the run's id and tags; the config's site list
    dropped. The rest of the config (output folder, cap, command) is the job's."""
    job = job_of(tmp_path, 50)
    own = job.for_site("s0001")
    assert own.plan.sites == ("s0001",)
    assert own.plan.site("s0001") == job.plan.site("s0001")
    assert own.plan.site("s0001").timeout == 7 and own.plan.site("s0001").retry_count == 3
    assert set(own.plan.settings) <= {"s0001"} and set(own.plan.given) <= {"s0001"}
    assert own.plan.config.sites is None and own.plan.config.sites_file is None
    assert own.timeouts == {"s0001": job.timeouts["s0001"]}
    assert own.timeout("s0001") == SiteTimeout(61.0, "timeout 61 s")
    assert own.check_history == {"s0001": [1.0]}
    assert (own.flow_run_id, own.tags) == (job.flow_run_id, job.tags)
    assert own.plan.output_dir == job.plan.output_dir
    assert own.plan.max_concurrent_sites == job.plan.max_concurrent_sites
    assert own.plan.config.command == job.plan.config.command
    plain = job.for_site("s0007")  # a site without an entry: the config's settings
    assert plain.plan.site("s0007") == job.plan.site("s0007")
    assert plain.plan.settings == {} or set(plain.plan.settings) == {"s0007"}


def test_what_a_task_run_carries_does_not_grow_with_the_site_list(tmp_path: Path) -> None:
    """Pickled (as Dask sends it), one site's share of a 2,000-site job is the size of one
    site's share of a 10-site job: the scheduler holds one per queued task run."""
    small = len(pickle.dumps(job_of(tmp_path / "small", 10).for_site("s0005")))
    large = len(pickle.dumps(job_of(tmp_path / "large", 2000).for_site("s0005")))
    assert abs(large - small) < 64, (small, large)
    whole = len(pickle.dumps(job_of(tmp_path / "whole", 2000)))
    assert whole > 20 * large  # the whole job does grow: it is not what is sent


class StepRunner:
    """A task runner whose submit returns a future at once; submitting site N ends the
    future of site N-1 (as a short site ends while later ones are still being submitted).
    It keeps no future of its own once that future has ended."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.parameters: list[dict[str, Any]] = []
        self._running: concurrent.futures.Future[Any] | None = None

    def submit(self, task: Any, parameters: dict[str, Any], dependencies: Any) -> Any:
        if self._running is not None:
            self._running.set_result({"site": self.submitted[-1]})
        self.submitted.append(parameters["site"])
        self.parameters.append(parameters)
        self._running = concurrent.futures.Future()
        return PrefectConcurrentFuture(uuid4(), self._running)

    def end_last(self) -> None:
        if self._running is not None:
            self._running.set_result({"site": self.submitted[-1]})
            self._running = None


def test_sites_are_collected_as_they_end_while_the_rest_are_still_submitted(
    tmp_path: Path,
) -> None:
    """Site s0000 ends when s0001 is submitted: it is yielded before s0002 is submitted, and
    once the flow lets go of it no one holds its future (the Dask scheduler then forgets its
    task). Every site is submitted once, in the job's order, with its own share of the job,
    and yielded once."""
    job = job_of(tmp_path, 4)
    runner = StepRunner()
    ends = sites_as_they_end(runner, job)  # type: ignore[arg-type]
    site, future = next(ends)
    assert site == "s0000" and runner.submitted == ["s0000", "s0001"]
    assert future.wrapped_future.done()
    gone = weakref.ref(future)
    del future
    gc.collect()
    assert gone() is None
    seen = [site]
    for site, _future in ends:
        seen.append(site)
        if len(runner.submitted) == 4:
            runner.end_last()
    assert sorted(seen) == sorted(job.plan.sites) and len(seen) == 4
    assert runner.submitted == list(job.plan.sites)
    assert [p["job"].plan.sites for p in runner.parameters] == [(s,) for s in job.plan.sites]
