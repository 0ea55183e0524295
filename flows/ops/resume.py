"""`--retry-failed`, for `run` and `submit`: which earlier run, which of its sites run
again, and what is said about it. The one home of `--retry-failed`; the CLI only prints.

`find_retry` is the whole step: `earlier_run` reads the earlier flow run from the API, then
`choose` (plain Python: no API) decides, and a run left unfinished by a dead process is
marked Crashed (`mark_crashed`, which `doctor --fix` uses too). A site is skipped only when
it succeeded (in that run, or in the run *that* one resumed); everything else runs again:
failed, timed out, cancelled, never started, or left Running by a process that is gone.
`Retry.announcement` is what the command says before anything starts.

Importing this module loads no Prefect (the CLI's start imports `choose`): `earlier_run`
and `mark_crashed` import it when they are called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from flows.config import ConfigError, ConfigFiles, make_plan
from flows.names import FLOW_NAME
from flows.process.holders import holder_alive

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

UNFINISHED = frozenset({"Running", "Pending", "Scheduled", "AwaitingRetry", "Retrying"})
"""Task run states that only a run that died leaves behind (the run was not still running:
`choose` refuses that)."""


@dataclass(frozen=True)
class EarlierRun:
    """What the API knows of the run being resumed."""

    id: str
    name: str
    state: str  # the state's name: "Failed", "Running", "Crashed", ...
    final: bool
    parameters: Mapping[str, object]
    sites: tuple[str, ...]  # the run's site list, in order
    outcomes: Mapping[str, str]  # site -> its task run's state name ("Completed", ...)
    holder_alive: bool | None  # its process: alive, gone, or can't tell (None)
    deployment: str | None = None  # "flow/name" when a deployment made it


@dataclass(frozen=True)
class RetryChoice:
    """What `--retry-failed` does with each site of the earlier run."""

    rerun: tuple[str, ...]
    skip: dict[str, str]  # site -> note for the summary's `error` column
    why: dict[str, str]  # rerun site -> its earlier outcome


@dataclass(frozen=True)
class Retry:
    """`--retry-failed REF`, found: the earlier run, which of its sites run again, and what
    was done to the run on the way (`notes`: a line each, said at once)."""

    earlier: EarlierRun
    choice: RetryChoice
    notes: tuple[str, ...] = ()

    def announcement(self) -> list[str]:
        """Which run is resumed, which of its sites run again (and why), which are skipped."""
        earlier, choice = self.earlier, self.choice
        return [
            f"resuming flow run {earlier.name} ({earlier.id}, {earlier.state}):",
            f"  running again {len(choice.rerun)}: " + _named(choice.rerun, choice.why),
            f"  skipped {len(choice.skip)} (succeeded): " + _named(tuple(choice.skip), {}),
        ]


def _named(sites: Sequence[str], why: Mapping[str, str], shown: int = 10) -> str:
    """`a.com (exit code 3), b.com, and 4 more`, or `none`."""
    if not sites:
        return "none"
    names = [f"{site} ({why[site]})" if site in why else site for site in sites[:shown]]
    more = f", and {len(sites) - shown} more" if len(sites) > shown else ""
    return ", ".join(names) + more


def find_retry(ref: str, configs: ConfigFiles | None = None) -> Retry:
    """The flow run `--retry-failed REF` names, and which of its sites to run again. Raises
    `ConfigError` when REF names no run, or one that may still be running; a run left
    unfinished by a dead process is marked Crashed first (it is over), and a note says so.
    `configs`: the command's config files, each read once (the earlier run's config, when
    its parameters hold no `sites`, may be the one the command reads too)."""
    earlier = earlier_run(ref, configs)
    choice = choose(earlier)
    notes: tuple[str, ...] = ()
    if not earlier.final:
        mark_crashed(earlier.id, "its process is gone (found by --retry-failed)")
        notes = (f"flow run {earlier.name} was {earlier.state} with its process gone: now Crashed",)
    return Retry(earlier, choice, notes)


def choose(earlier: EarlierRun) -> RetryChoice:
    """Split the earlier run's sites into those to run again and those to skip.

    Raises `ConfigError` when the earlier run may still be running: resuming it would run
    its sites twice at once.
    """
    if not earlier.final and earlier.holder_alive is not False:
        how = (
            "its process is still alive"
            if earlier.holder_alive
            else "this host can't tell whether its process is gone"
        )
        raise ConfigError(
            [
                f"--retry-failed {earlier.id}: flow run {earlier.name!r} is {earlier.state} and "
                f"{how}; wait for it, cancel it, or run `site-pipeline doctor --fix` once its "
                "process is gone"
            ]
        )
    carried = earlier.parameters.get("skip") or {}
    if not isinstance(carried, Mapping):
        carried = {}
    skip: dict[str, str] = {}
    why: dict[str, str] = {}
    for site in earlier.sites:
        outcome = earlier.outcomes.get(site)
        if site in carried:
            skip[site] = str(carried[site])
        elif outcome == "Completed":
            skip[site] = f"succeeded in flow run {earlier.name} ({earlier.id})"
        elif outcome is None:
            why[site] = "never started"
        elif outcome in UNFINISHED:
            why[site] = f"left {outcome} by a process that is gone"
        else:
            why[site] = outcome.lower()
    rerun = tuple(site for site in earlier.sites if site not in skip)
    return RetryChoice(rerun, skip, why)


def earlier_run(ref: str, configs: ConfigFiles | None = None) -> EarlierRun:
    """The flow run that `--retry-failed REF` resumes: a flow run id, or `last` (the most
    recently started `site-pipeline` run). Raises `ConfigError` for a REF that names none.
    Its config is read (through `configs`) only when its parameters hold no `sites`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = _last_run(client) if ref == "last" else _run_by_id(client, ref)
        deployment = _deployment_of(client, run)
        outcomes = _outcomes(client, run.id)
    params = dict(run.parameters)
    state = run.state
    return EarlierRun(
        id=str(run.id),
        name=run.name,
        state=(state.name if state else None) or "Pending",
        final=bool(state and state.is_final()),
        parameters=params,
        sites=_site_list(params, configs or ConfigFiles()),
        outcomes=outcomes,
        holder_alive=holder_alive(run.labels),
        deployment=deployment,
    )


def _last_run(client: SyncPrefectClient) -> FlowRun:
    """`--retry-failed last`: the flow's most recently started run."""
    from flows.ops.queries import latest_runs
    from flows.ops.server import api_target

    found = latest_runs(client, 1)
    if not found:
        raise ConfigError([f"--retry-failed last: no {FLOW_NAME} flow run on {api_target()}"])
    return found[0]


def _run_by_id(client: SyncPrefectClient, ref: str) -> FlowRun:
    """`--retry-failed ID`: that flow run, which must be one of this flow's."""
    from prefect.exceptions import ObjectNotFound

    from flows.ops.server import api_target

    try:
        run = client.read_flow_run(UUID(ref))
    except (ValueError, ObjectNotFound):
        raise ConfigError(
            [f"--retry-failed {ref!r}: expected `last` or the id of a flow run on {api_target()}"]
        ) from None
    flow = client.read_flow(run.flow_id)
    if flow.name != FLOW_NAME:
        raise ConfigError(
            [
                f"--retry-failed {ref}: flow run {run.name!r} is of flow {flow.name!r}; "
                f"expected a {FLOW_NAME} run"
            ]
        )
    return run


def _deployment_of(client: SyncPrefectClient, run: FlowRun) -> str | None:
    """`flow/name` of the deployment that made the run; None for none (or one deleted)."""
    from prefect.exceptions import ObjectNotFound

    if run.deployment_id is None:
        return None
    try:
        return f"{FLOW_NAME}/{client.read_deployment(run.deployment_id).name}"
    except ObjectNotFound:
        return None


def _outcomes(client: SyncPrefectClient, flow_run_id: UUID) -> dict[str, str]:
    """Each site's task run state name in the flow run; `Completed` wins over the others
    (a site with a completed task run succeeded)."""
    from flows.ops.queries import task_runs

    outcomes: dict[str, str] = {}
    for task_run in task_runs(client, [flow_run_id], None, 1_000_000):
        state = task_run.state
        if outcomes.get(task_run.name) != "Completed":
            completed = state is not None and state.is_completed()
            outcomes[task_run.name] = (
                "Completed" if completed else (state.name if state else None) or "Pending"
            )
    return outcomes


def _site_list(params: Mapping[str, Any], configs: ConfigFiles) -> tuple[str, ...]:
    """The run's site list: its `sites` parameter, else its config's sites."""
    sites = params.get("sites")
    if not isinstance(sites, list):
        config_path = params.get("config_path")
        loaded = configs.read(config_path if isinstance(config_path, str) else None)
        sites = list(make_plan(loaded).sites)
    return tuple(str(site) for site in sites)


def mark_crashed(
    flow_run_id: str | UUID, message: str, client: SyncPrefectClient | None = None
) -> None:
    """Set a flow run left Running by a dead process to Crashed (forced: it is over)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    if client is None:
        with get_client(sync_client=True) as own:
            mark_crashed(flow_run_id, message, own)
        return
    client.set_flow_run_state(UUID(str(flow_run_id)), Crashed(message=message), force=True)
