"""`site-pipeline`: run, validate and manage the site pipeline from a terminal.

Exit status: 0 every site succeeded, 1 some site did not, 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from flows.config import (
    ConfigError,
    RunPlan,
    build_argv,
    load_plan,
    read_sites_file,
    site_output_dir,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number > 0") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number > 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="site-pipeline",
        description="Run a per-site pipeline over many sites with Prefect: retries, "
        "timeouts that stop the process group, and a global concurrency cap.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--config",
            metavar="PATH",
            help="config file (default: $SITE_PIPELINE_CONFIG, then ./config.yaml)",
        )
        return sub

    run = with_config(commands.add_parser("run", help="run the flow on the configured Prefect API"))
    run.add_argument("--site", action="append", metavar="SITE", help="run this site (repeatable)")
    run.add_argument("--sites-file", metavar="FILE", help="one site per line, '#' comments")
    run.add_argument("--max-concurrent", type=_positive_int, metavar="N", help="override the cap")
    run.add_argument("--sequential", action="store_true", help="one site at a time, in order")
    run.add_argument("--summary-json", metavar="PATH", help="write the summary JSON here")
    loudness = run.add_mutually_exclusive_group()
    loudness.add_argument(
        "-v", "--verbose", action="store_true", help="also print every line the pipelines print"
    )
    loudness.add_argument(
        "-q", "--quiet", action="store_true", help="print only problems and the final table"
    )

    with_config(
        commands.add_parser("validate", help="check the config and sites; show what would run")
    )

    setup = with_config(
        commands.add_parser("setup", help="create or update the work pool and concurrency limit")
    )
    setup.add_argument("--pool", default="site-pool", help="process work pool (default: site-pool)")

    submit = commands.add_parser(
        "submit", help="start a run of a deployment, checking its parameters first"
    )
    submit.add_argument("--deployment", default="site-pipeline/adhoc", metavar="FLOW/NAME")
    submit.add_argument("--site", action="append", metavar="SITE", help="the sites (repeatable)")
    submit.add_argument(
        "--max-concurrent", type=_positive_int, metavar="N", help="override the cap"
    )
    submit.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a flow parameter; VALUE is JSON, or else a string",
    )
    submit.add_argument("--no-watch", action="store_true", help="return once the run is created")

    history = commands.add_parser("history", help="recent runs and each site's last status")
    history.add_argument(
        "--limit", type=_positive_int, default=10, metavar="N", help="runs to show"
    )
    history.add_argument("--site", metavar="SITE", help="only this site")
    history.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


def _fail(message: str) -> NoReturn:
    for line in message.splitlines():
        print(f"site-pipeline: error: {line}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _plan(args: argparse.Namespace) -> RunPlan:
    sites: list[str] | None = args.site if getattr(args, "site", None) else None
    sites_file = getattr(args, "sites_file", None)
    if sites and sites_file:
        _fail("--site and --sites-file: expected one or the other, not both")
    if sites_file:
        sites = read_sites_file(Path(sites_file).absolute())
    return load_plan(
        args.config,
        sites=sites,
        max_concurrent_sites=getattr(args, "max_concurrent", None),
        use_async=False if getattr(args, "sequential", False) else None,
    )


def _validate(plan: RunPlan) -> int:
    site = plan.sites[0]
    argv = build_argv(plan.config, site, 1, site_output_dir(plan.output_dir, site))
    print(f"config: {plan.config_path}")
    more = ", ..." if len(plan.sites) > 5 else ""
    mode = "async" if plan.use_async else "sequential"
    print(f"sites: {len(plan.sites)} ({', '.join(plan.sites[:5])}{more})")
    print(f"cap: {plan.max_concurrent_sites} at once ({mode}), tag {plan.config.concurrency_tag!r}")
    print(
        f"attempts: {plan.config.retry_count}, {plan.config.async_settings.retry_backoff} backoff "
        f"from {plan.config.retry_delay:g}s, timeout {plan.config.timeout:g}s"
    )
    print(f"working dir: {plan.working_dir}")
    print(f"output dir: {plan.output_dir}")
    print(f"first site's argv: {json.dumps(argv)}")
    return EXIT_OK


def _run(args: argparse.Namespace, plan: RunPlan) -> int:
    from prefect.settings import get_current_settings
    from rich.console import Console

    from flows import admin
    from flows.api import PipelineRunError, run_pipeline_summary
    from flows.console import Verbosity, run_console, summary_table
    from flows.report import count_line, format_table

    try:
        admin.check_reachable()
    except admin.ApiUnreachable as exc:
        print(f"site-pipeline: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    settings = get_current_settings()
    if not settings.api.url:
        print(
            "site-pipeline: starting a temporary Prefect server for this run (a few seconds); "
            "to skip this, keep one running: `prefect server start --background` and "
            "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`",
            file=sys.stderr,
        )
    verbosity: Verbosity = "verbose" if args.verbose else "quiet" if args.quiet else "normal"
    err, out = Console(stderr=True), Console()
    try:
        with run_console(len(plan.sites), verbosity, err) as view:
            summary = run_pipeline_summary(
                plan.sites,
                config_path=plan.config_path,
                max_concurrent_sites=plan.max_concurrent_sites,
                use_async=plan.use_async,
                on_progress=view.site_done if view is not None else None,
            )
    except PipelineRunError as exc:
        print(f"site-pipeline: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if out.is_terminal:
        out.print(summary_table(summary))
        print(count_line(summary))
    else:
        print(format_table(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"summary: {args.summary_json}")
    if settings.api.url and settings.ui_url:  # a server that keeps running: link to the run
        print(
            f"flow run: {str(settings.ui_url).rstrip('/')}/runs/flow-run/{summary['flow_run_id']}"
        )
    return EXIT_OK if summary["state"] == "Completed" else EXIT_FAILED


def _history(args: argparse.Namespace) -> int:
    from flows import admin

    if args.site:
        from flows.config import site_problem

        problem = site_problem(args.site)
        if problem:
            _fail(f"--site {args.site!r}: {problem}")
    try:
        admin.check_reachable()
        data = admin.history(limit=args.limit, site=args.site)
    except admin.ApiUnreachable as exc:
        print(f"site-pipeline: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    from rich.console import Console

    out = Console()
    if not out.is_terminal:
        print(admin.format_history(data))
        return EXIT_OK
    from flows.console import rows_table

    runs, sites = admin.history_rows(data)
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

    from flows.config import check_sites
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
    return params


def _submit(args: argparse.Namespace) -> int:
    from flows import admin

    try:
        params = deployment_parameters(args.param, args.site, args.max_concurrent)
    except ConfigError as exc:
        _fail(str(exc))
    try:
        admin.check_reachable()
    except admin.ApiUnreachable as exc:
        print(f"site-pipeline: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync here
            args.deployment,
            parameters=params,
            timeout=0 if args.no_watch else None,
            as_subflow=False,
        )
    except ObjectNotFound:
        _fail(f"--deployment {args.deployment!r}: no such deployment; run `prefect deploy --all`")
    state = flow_run.state
    print(f"flow run {flow_run.name} ({flow_run.id}): {state.name if state else 'unknown'}")
    if args.no_watch:
        return EXIT_OK
    if state is not None and state.message:
        print(state.message)
    return EXIT_OK if state is not None and state.is_completed() else EXIT_FAILED


def _setup(args: argparse.Namespace, plan: RunPlan) -> int:
    from flows import admin

    try:
        target = admin.check_reachable()
        print(f"Prefect API: {target}")
        for change in admin.setup(plan, pool=args.pool):
            print(change)
    except admin.ApiUnreachable as exc:
        print(f"site-pipeline: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        _fail(str(exc))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "history":
        return _history(args)
    if args.command == "submit":
        return _submit(args)
    try:
        plan = _plan(args)
    except ConfigError as exc:
        _fail(str(exc))
    for warning in plan.warnings:
        print(f"site-pipeline: warning: {warning}", file=sys.stderr)
    if args.command == "validate":
        return _validate(plan)
    if args.command == "setup":
        return _setup(args, plan)
    try:
        return _run(args, plan)
    except KeyboardInterrupt:
        print("site-pipeline: interrupted; pipelines stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
