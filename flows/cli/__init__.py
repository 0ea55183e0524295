"""`site-pipeline`: run, validate and manage the site pipeline from a terminal.

Exit status: 0 every site succeeded, 1 some site did not, 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from flows.config import (
    ConfigError,
    RunPlan,
    build_argv,
    check_sites,
    load_plan,
    read_sites_file,
    site_output_dir,
)
from flows.ops.resume import EarlierRun, RetryChoice, choose

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number > 0") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number > 0")
    return value


def _given(text: str) -> str:
    """A path, name or id: an empty value is a mistake (a variable that was not set), never
    "use the default"."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a non-empty value")
    return text


def _deployment(text: str) -> str:
    """FLOW/NAME, as `prefect deployment run` takes it."""
    flow, slash, name = _given(text).partition("/")
    if not (slash and flow.strip() and name.strip()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected FLOW/NAME, e.g. site-pipeline/adhoc")
    return text


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
            type=_given,
            metavar="PATH",
            help="config file (default: $SITE_PIPELINE_CONFIG, then ./config.yaml)",
        )
        return sub

    run = with_config(commands.add_parser("run", help="run the flow on the configured Prefect API"))
    run.add_argument(
        "--site", action="append", type=_given, metavar="SITE", help="run this site (repeatable)"
    )
    run.add_argument(
        "--sites-file", type=_given, metavar="FILE", help="one site per line, '#' comments"
    )
    run.add_argument("--max-concurrent", type=_positive_int, metavar="N", help="override the cap")
    run.add_argument("--sequential", action="store_true", help="one site at a time, in order")
    run.add_argument(
        "--summary-json", type=_given, metavar="PATH", help="write the summary JSON here"
    )
    run.add_argument(
        "--retry-failed",
        nargs="?",
        const="last",
        type=_given,
        metavar="FLOW_RUN_ID",
        help="run again the sites that did not succeed in that flow run (default: last), "
        "with its config and overrides; the others are listed as skipped",
    )
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
    setup.add_argument(
        "--pool",
        type=_given,
        default="site-pool",
        help="process work pool (default: site-pool)",
    )
    setup.add_argument(
        "--heartbeat-grace",
        type=_positive_int,
        default=90,
        metavar="SECONDS",
        help="mark a flow run Crashed after this long without a heartbeat (default: 90; "
        "prefect.yaml sends one every 30 s)",
    )

    submit = commands.add_parser(
        "submit", help="start a run of a deployment, checking its parameters first"
    )
    submit.add_argument(
        "--deployment",
        type=_deployment,
        metavar="FLOW/NAME",
        help="default: site-pipeline/adhoc, or with --retry-failed the deployment of that run",
    )
    submit.add_argument(
        "--site", action="append", type=_given, metavar="SITE", help="the sites (repeatable)"
    )
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
    submit.add_argument(
        "--retry-failed",
        nargs="?",
        const="last",
        type=_given,
        metavar="FLOW_RUN_ID",
        help="run again, through the deployment, the sites that did not succeed in that flow "
        "run (default: last)",
    )

    doctor = commands.add_parser(
        "doctor", help="check the API, the limit, and runs or slots left behind by dead processes"
    )
    doctor.add_argument("--config", type=_given, metavar="PATH", help="config file (as for run)")
    doctor.add_argument(
        "--fix", action="store_true", help="mark those runs Crashed and free their slots"
    )

    history = commands.add_parser("history", help="recent runs and each site's last status")
    history.add_argument(
        "--limit", type=_positive_int, default=10, metavar="N", help="runs to show"
    )
    history.add_argument("--site", type=_given, metavar="SITE", help="only this site")
    history.add_argument("--json", action="store_true", help="print JSON for scripts")
    # No abbreviations: `--sites x` must not quietly mean `--sites-file x`, and a script's
    # abbreviation must not change meaning when an option is added.
    for sub in (parser, *commands.choices.values()):
        sub.allow_abbrev = False
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
    if sites:
        check_sites(sites, "--site")  # named as the user typed it, not as the flow parameter
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


def _retry_plan(args: argparse.Namespace) -> tuple[RunPlan, dict[str, str]]:
    """The plan and the `skip` of `run --retry-failed REF`: the earlier run's sites, config
    and overrides (a flag given now wins). Exits 2 when REF names no run, or one that may
    still be running."""
    earlier, choice = _earlier_run(args.retry_failed)
    params = earlier.parameters
    config_path = args.config or params.get("config_path")
    cap = args.max_concurrent or params.get("max_concurrent_sites")
    use_async = False if args.sequential else params.get("use_async")
    try:
        plan = load_plan(
            config_path if isinstance(config_path, str) else None,
            sites=list(earlier.sites),
            max_concurrent_sites=cap if isinstance(cap, int) else None,
            use_async=use_async if isinstance(use_async, bool) else None,
        )
    except ConfigError as exc:
        _fail(str(exc))
    _announce_resume(earlier, choice)
    return plan, choice.skip


def _earlier_run(ref: str) -> tuple[EarlierRun, RetryChoice]:
    """The flow run `--retry-failed REF` names, and which of its sites to run again. Exits 2
    when REF names no run, or one that may still be running; a run left unfinished by a dead
    process is marked Crashed first (it is over), and the user is told."""
    from flows.ops import admin

    try:
        earlier = admin.earlier_run(ref)
        choice = choose(earlier)
    except ConfigError as exc:
        _fail(str(exc))
    if not earlier.final:
        admin.mark_crashed(earlier.id, "its process is gone (found by --retry-failed)")
        print(f"flow run {earlier.name} was {earlier.state} with its process gone: now Crashed")
    return earlier, choice


def _announce_resume(earlier: EarlierRun, choice: RetryChoice) -> None:
    print(f"resuming flow run {earlier.name} ({earlier.id}, {earlier.state}):")
    print(f"  running again {len(choice.rerun)}: " + _named(choice.rerun, choice.why))
    print(f"  skipped {len(choice.skip)} (succeeded): " + _named(tuple(choice.skip), {}))


def _named(sites: Sequence[str], why: dict[str, str], shown: int = 10) -> str:
    if not sites:
        return "none"
    names = [f"{site} ({why[site]})" if site in why else site for site in sites[:shown]]
    more = f", and {len(sites) - shown} more" if len(sites) > shown else ""
    return ", ".join(names) + more


def _run(args: argparse.Namespace, plan: RunPlan, skip: dict[str, str] | None = None) -> int:
    from prefect.settings import get_current_settings
    from rich.console import Console

    from flows.api import PipelineRunError, run_pipeline_summary
    from flows.cli.console import Verbosity, run_console, summary_table
    from flows.interrupts import StopRequest, exit_status, on_signals
    from flows.report import count_line, format_table

    if skip is not None and len(skip) == len(plan.sites):
        print("nothing to retry: every site succeeded")
        return EXIT_OK
    err, out = Console(stderr=True), Console()
    stop = StopRequest()

    def notice(text: str) -> None:
        err.print(f"site-pipeline: {text}", highlight=False, markup=False)

    # Dask workers can't see a stop request: there the first signal stops at once.
    polite = plan.config.task_runner.kind == "threads"
    with on_signals(stop, notice, polite=polite):
        settings = get_current_settings()
        if not settings.api.url:
            print(
                "site-pipeline: starting a temporary Prefect server for this run (a few "
                "seconds); to skip this, keep one running: `prefect server start --background` "
                "and `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`",
                file=sys.stderr,
            )
        if _connect() is None:
            return EXIT_FAILED
        verbosity: Verbosity = "verbose" if args.verbose else "quiet" if args.quiet else "normal"
        outcome: list[Any] = []

        def flow_thread(on_progress: Callable[[int, int, int], None] | None) -> None:
            try:
                outcome.append(
                    run_pipeline_summary(
                        plan.sites,
                        config_path=plan.config_path,
                        max_concurrent_sites=plan.max_concurrent_sites,
                        use_async=plan.use_async,
                        on_progress=on_progress,
                        skip=skip,
                        stop=stop,
                    )
                )
            except BaseException as exc:  # re-raised in the main thread
                outcome.append(exc)

        # The flow runs in a thread of its own: Prefect's engine sets its own SIGTERM handler
        # when it runs in the main thread, and ours must see the signal to cancel politely.
        try:
            with run_console(len(plan.sites), verbosity, err) as view:
                runner = threading.Thread(
                    target=flow_thread,
                    args=(view.site_done if view is not None else None,),
                    name="site-pipeline-flow",
                    daemon=True,
                )
                runner.start()
                while runner.is_alive():
                    runner.join(0.2)
        except KeyboardInterrupt:  # a second signal (or a first one on Dask): stop at once
            from flows.process.control import control_for

            control_for(plan.config.process_control).stop_all(plan.config.kill_grace_seconds)
            print("site-pipeline: interrupted; pipelines stopped", file=sys.stderr)
            return exit_status(stop.signal)
        if isinstance(outcome[0], PipelineRunError):
            print(f"site-pipeline: {outcome[0]}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        summary: dict[str, Any] = outcome[0]
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
    if summary["state"] == "Cancelled" and stop.signal is not None:
        return exit_status(stop.signal)
    return EXIT_OK if summary["state"] == "Completed" else EXIT_FAILED


def _history(args: argparse.Namespace) -> int:
    from flows.ops import admin

    if args.site:
        from flows.config import site_problem

        problem = site_problem(args.site)
        if problem:
            _fail(f"--site {args.site!r}: {problem}")
    if _connect() is None:
        return EXIT_FAILED
    data = admin.history(limit=args.limit, site=args.site)
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    from rich.console import Console

    out = Console()
    if not out.is_terminal:
        print(admin.format_history(data))
        return EXIT_OK
    from flows.cli.console import rows_table

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
    skip = params.get("skip")
    if skip is not None and not (
        isinstance(skip, dict) and all(isinstance(v, str) for v in skip.values())
    ):
        raise ConfigError([f"skip = {skip!r}: expected a JSON object of site -> note"])
    return params


def _submit(args: argparse.Namespace) -> int:

    if args.retry_failed and args.site:
        _fail("--retry-failed and --site: expected one or the other")
    try:
        params = deployment_parameters(args.param, args.site, args.max_concurrent)
    except ConfigError as exc:
        _fail(str(exc))
    if _connect() is None:
        return EXIT_FAILED
    if args.retry_failed:
        earlier, choice = _earlier_run(args.retry_failed)
        if not choice.rerun:
            print(f"nothing to retry: every site succeeded in flow run {earlier.name}")
            return EXIT_OK
        inherited = {
            key: value
            for key, value in earlier.parameters.items()
            if key in ("config_path", "max_concurrent_sites", "use_async")
        }
        params = {**inherited, **params, "sites": list(earlier.sites), "skip": choice.skip}
        args.deployment = args.deployment or earlier.deployment
        _announce_resume(earlier, choice)
    args.deployment = args.deployment or "site-pipeline/adhoc"
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
    from flows.ops import admin

    target = _connect()
    if target is None:
        return EXIT_FAILED
    print(f"Prefect API: {target}")
    try:
        for change in admin.setup(plan, pool=args.pool, heartbeat_grace=args.heartbeat_grace):
            print(change)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "history":
        return _history(args)
    if args.command == "submit":
        return _submit(args)
    if args.command == "doctor":
        return _doctor(args)
    if args.command == "run" and args.retry_failed:
        return _retry(args)
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


def _retry(args: argparse.Namespace) -> int:
    if args.site or args.sites_file:
        _fail(
            "--retry-failed and --site/--sites-file: expected one or the other; "
            "--retry-failed takes the sites of the run it resumes"
        )
    try:
        if _connect() is None:
            return EXIT_FAILED
        plan, skip = _retry_plan(args)
        return _run(args, plan, skip)
    except KeyboardInterrupt:
        print("site-pipeline: interrupted; pipelines stopped", file=sys.stderr)
        return 130


def _doctor(args: argparse.Namespace) -> int:
    from flows.ops import admin

    plan = None
    if args.config or Path("config.yaml").exists() or os.environ.get("SITE_PIPELINE_CONFIG"):
        try:
            plan = load_plan(args.config)
        except ConfigError as exc:
            _fail(str(exc))
    target = _connect()
    if target is None:
        return EXIT_FAILED
    print(f"Prefect API: {target}")
    lines, healthy = admin.doctor(plan, fix=args.fix)
    for line in lines:
        print(line)
    return EXIT_OK if healthy else EXIT_FAILED


def _connect() -> str | None:
    """Every command that uses the API starts here: check that it answers, and on the
    embedded default start the temporary server now, tied to this process (the reaper), so
    it ends with us however we end; left to Prefect, it would outlive a process killed by a
    signal or a broken pipe. The API's description, or None once the reason is printed."""
    from flows.ops import admin

    try:
        target = admin.check_reachable()
        admin.start_temporary_server()
    except admin.ApiUnreachable as exc:
        print(f"site-pipeline: error: {exc}", file=sys.stderr)
        return None
    return target


if __name__ == "__main__":
    sys.exit(main())
