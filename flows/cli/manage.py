"""`site-pipeline setup`, `submit`, `doctor` and `history`: the commands that manage or
look at what the Prefect server holds, rather than run the flow here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.cli.common import EXIT_FAILED, EXIT_OK, connect, fail, retry_or_fail
from flows.config import ConfigError, RunPlan, check_sites, load_plan

# What `submit --retry-failed` takes from the earlier run's parameters (a flag given wins).
_INHERITED = ("config_path", "max_concurrent_sites", "use_async")


def setup(args: argparse.Namespace, plan: RunPlan) -> int:
    """`setup`: create or update the work pool and the concurrency limit; print each change."""
    from flows import ops

    connection = connect()
    if connection is None:
        return EXIT_FAILED
    print(f"Prefect API: {connection.target}")
    try:
        for change in ops.setup(plan, pool=args.pool, heartbeat_grace=args.heartbeat_grace):
            print(change)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    return EXIT_OK


def doctor(args: argparse.Namespace) -> int:
    """`doctor`: the API, the limit, and what dead processes left behind (`--fix`: clean it)."""
    from flows import ops

    plan = None
    if args.config or Path("config.yaml").exists() or os.environ.get("SITE_PIPELINE_CONFIG"):
        try:
            plan = load_plan(args.config)
        except ConfigError as exc:
            fail(str(exc))
    embedded = ops.api_url_unset()  # the user set no URL: the kept local server is theirs
    connection = connect()
    if connection is None:
        return EXIT_FAILED
    print(f"Prefect API: {connection.target}")
    for line in _local_server_status()[0] if embedded else []:
        print(line)
    lines, healthy = ops.doctor(plan, fix=args.fix)
    for line in lines:
        print(line)
    return EXIT_OK if healthy else EXIT_FAILED


def history(args: argparse.Namespace) -> int:
    """`history`: recent runs and each site's last status, as tables or `--json`."""
    from flows import ops

    if args.site:
        from flows.config import site_problem

        problem = site_problem(args.site)
        if problem:
            fail(f"--site {args.site!r}: {problem}")
    if connect() is None:
        return EXIT_FAILED
    data = ops.history(limit=args.limit, site=args.site)
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    from rich.console import Console

    out = Console()
    if not out.is_terminal:
        print(ops.format_history(data))
        return EXIT_OK
    from flows.cli.console import rows_table

    runs, sites = ops.history_rows(data)
    out.print(rows_table(*runs, title=f"Last {len(data['runs'])} runs ({data['api']})"))
    out.print(rows_table(*sites, title="Sites"))
    return EXIT_OK


def deployment_parameters(
    pairs: Sequence[str], sites: Sequence[str] | None, max_concurrent: int | None
) -> dict[str, Any]:
    """Flow parameters from `--param KEY=VALUE` and the shortcuts, checked like the flow would.

    Raises `ConfigError` for an unknown key, a bad value or a bad site name.
    """
    import inspect

    from flows.site_pipeline import run_sites

    known = list(inspect.signature(run_sites.fn).parameters)
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in known:
            raise ConfigError(
                [
                    f"--param {pair!r}: unknown parameter {key!r}; expected KEY=VALUE with KEY "
                    f"one of {', '.join(known)}"
                ]
            )
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    if sites:
        params["sites"] = list(sites)
    if max_concurrent is not None:
        params["max_concurrent_sites"] = max_concurrent
    _check_parameters(params)
    return params


def _check_parameters(params: dict[str, Any]) -> None:
    """Check each parameter's type as the flow would; `sites` is made canonical in place.
    Raises `ConfigError`."""
    if "sites" in params:
        value = params["sites"]
        if not isinstance(value, list):
            raise ConfigError([f"sites = {value!r}: expected a JSON list of site names"])
        params["sites"], _ = check_sites(value, "sites")
    cap = params.get("max_concurrent_sites")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
        raise ConfigError([f"max_concurrent_sites = {cap!r}: expected a whole number > 0"])
    if "config_path" in params and not isinstance(params["config_path"], str):
        raise ConfigError([f"config_path = {params['config_path']!r}: expected a string"])
    if "use_async" in params and not isinstance(params["use_async"], bool):
        raise ConfigError([f"use_async = {params['use_async']!r}: expected true or false"])
    skip = params.get("skip")
    if skip is not None and not (
        isinstance(skip, dict) and all(isinstance(v, str) for v in skip.values())
    ):
        raise ConfigError([f"skip = {skip!r}: expected a JSON object of site -> note"])


def submit(args: argparse.Namespace) -> int:
    """`submit`: start a run of a deployment with checked parameters, and (unless
    `--no-watch`) wait for its final state."""
    if args.retry_failed and args.site:
        fail("--retry-failed and --site: expected one or the other")
    try:
        params = deployment_parameters(args.param, args.site, args.max_concurrent)
    except ConfigError as exc:
        fail(str(exc))
    if connect() is None:
        return EXIT_FAILED
    if args.retry_failed:
        retry = retry_or_fail(args.retry_failed)
        earlier, choice = retry.earlier, retry.choice
        if not choice.rerun:
            print(f"nothing to retry: every site succeeded in flow run {earlier.name}")
            return EXIT_OK
        inherited = {k: v for k, v in earlier.parameters.items() if k in _INHERITED}
        params = {**inherited, **params, "sites": list(earlier.sites), "skip": choice.skip}
        args.deployment = args.deployment or earlier.deployment
        for line in retry.announcement():
            print(line)
    return _start_deployment(args.deployment or "site-pipeline/adhoc", params, args.no_watch)


def _start_deployment(deployment: str, params: dict[str, Any], no_watch: bool) -> int:
    """Start a run of `deployment` and print its state: 0 once created (`no_watch`), else
    0 when it completed."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync here
            deployment,
            parameters=params,
            timeout=0 if no_watch else None,
            as_subflow=False,
        )
    except ObjectNotFound:
        fail(f"--deployment {deployment!r}: no such deployment; run `prefect deploy --all`")
    state = flow_run.state
    print(f"flow run {flow_run.name} ({flow_run.id}): {state.name if state else 'unknown'}")
    if no_watch:
        return EXIT_OK
    if state is not None and state.message:
        print(state.message)
    return EXIT_OK if state is not None and state.is_completed() else EXIT_FAILED


def _local_server_status() -> tuple[list[str], bool]:
    """The lines `server status` prints, and whether the local server is up."""
    import prefect
    from prefect.settings import get_current_settings

    from flows.ops import local_server

    return local_server.status(Path(get_current_settings().home), prefect.__version__)


def server_start(home: Path, idle: float | None) -> int:
    """`server start [--idle SECONDS]`: the kept server of `home`, started or reused, held
    until `server stop` (or for `idle` seconds); prints where its UI is."""
    import prefect

    from flows.ops import local_server
    from flows.ops.local_server_start import LocalServerFailed
    from flows.ops.server import log_tail, startup_timeout

    try:
        state, how = local_server.hold(home, prefect.__version__, startup_timeout(), idle)
    except LocalServerFailed as exc:
        print(f"site-pipeline: error: {exc}; its last lines:", file=sys.stderr)
        with open(exc.log, "rb") as log:
            for line in log_tail(log):
                print(f"  {line}", file=sys.stderr)
        return EXIT_FAILED
    until = "`site-pipeline server stop`" if idle is None else f"{idle:g} s from now, or later"
    what = "started" if how == "started" else "reused"
    print(f"{what} the local Prefect server at {state.url} for PREFECT_HOME {home}")
    print(f"UI: {state.ui_url}")
    print(f"it stays until {until}; runs with no PREFECT_API_URL use it")
    return EXIT_OK


def server(args: argparse.Namespace) -> int:
    """`server start`, `server status` (0 when the local server is up, 1 when none is) and
    `server stop`."""
    from prefect.settings import get_current_settings

    from flows.ops.local_server_checks import keeper_alive
    from flows.ops.local_server_files import live_users, read_state
    from flows.ops.local_server_start import stop_keeper

    settings = get_current_settings()
    if settings.api.url:
        print(
            f"note: PREFECT_API_URL is set ({settings.api.url}): runs use that server, "
            "not a local one",
            file=sys.stderr,
        )
    home = Path(settings.home)
    if args.action == "start":
        return server_start(home, args.idle)
    if args.action == "status":
        lines, up = _local_server_status()
        for line in lines:
            print(line)
        return EXIT_OK if up else EXIT_FAILED
    state = read_state(home)
    if state is None or not keeper_alive(state):
        print(f"no local server is running for PREFECT_HOME {home}")
        return EXIT_OK
    users = live_users(home)
    if not stop_keeper(home, state, timeout=30):
        print(
            f"site-pipeline: error: the keeper (pid {state.keeper_pid}) did not stop",
            file=sys.stderr,
        )
        return EXIT_FAILED
    note = f" ({len(users)} command{'s' if len(users) > 1 else ''} were using it)" if users else ""
    print(f"stopped the local Prefect server at {state.url}{note}")
    return EXIT_OK
