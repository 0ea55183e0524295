"""The `site-pipeline` command line: one small builder per command, the value checks, and
no abbreviations. Plain argparse: building it loads neither Prefect nor the config."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TypeAlias

    Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _positive_int(text: str) -> int:
    """A whole number > 0 (a cap, a limit, seconds)."""
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


def _with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--config PATH`, for the commands that read the config."""
    sub.add_argument(
        "--config",
        type=_given,
        metavar="PATH",
        help="config file (default: $SITE_PIPELINE_CONFIG, then ./config.yaml)",
    )
    return sub


def _add_cap(sub: argparse.ArgumentParser) -> None:
    """`--max-concurrent N`, for `run` and `submit`."""
    sub.add_argument("--max-concurrent", type=_positive_int, metavar="N", help="override the cap")


def _add_retry_failed(sub: argparse.ArgumentParser, text: str) -> None:
    """`--retry-failed [FLOW_RUN_ID]` (default: last), for `run` and `submit`."""
    sub.add_argument(
        "--retry-failed", nargs="?", const="last", type=_given, metavar="FLOW_RUN_ID", help=text
    )


def _add_sites(sub: argparse.ArgumentParser) -> None:
    """`--site` and `--sites-file`, for `run` and `validate`."""
    sub.add_argument(
        "--site", action="append", type=_given, metavar="SITE", help="run this site (repeatable)"
    )
    sub.add_argument(
        "--sites-file",
        type=_given,
        metavar="FILE",
        help="one site per line, '#' comments; or .json/.yaml: a list, or {\"sites\": [...]}",
    )


def _add_run(commands: Commands) -> None:
    """`run` with its options, and `validate` (`--config`, `--site`, `--sites-file`)."""
    run = _with_config(
        commands.add_parser("run", help="run the flow on the configured Prefect API")
    )
    _add_sites(run)
    _add_cap(run)
    run.add_argument("--sequential", action="store_true", help="one site at a time, in order")
    run.add_argument(
        "--summary-json", type=_given, metavar="PATH", help="write the summary JSON here"
    )
    _add_retry_failed(
        run,
        "run again the sites that did not succeed in that flow run (default: last), "
        "with its config and overrides; the others are listed as skipped",
    )
    loudness = run.add_mutually_exclusive_group()
    loudness.add_argument(
        "-v", "--verbose", action="store_true", help="also print every line the pipelines print"
    )
    loudness.add_argument(
        "-q", "--quiet", action="store_true", help="print only problems and the final table"
    )
    _add_sites(
        _with_config(
            commands.add_parser("validate", help="check the config and sites; show what would run")
        )
    )


def _add_setup(commands: Commands) -> None:
    """`setup`: the work pool and the concurrency limit."""
    setup = _with_config(
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
        "more than 30: prefect.yaml sends one every 30 s)",
    )


def _add_submit(commands: Commands) -> None:
    """`submit`: a run of a deployment."""
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
    _add_cap(submit)
    submit.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a flow parameter; VALUE is JSON, or else a string",
    )
    submit.add_argument("--no-watch", action="store_true", help="return once the run is created")
    _add_retry_failed(
        submit,
        "run again, through the deployment, the sites that did not succeed in that flow "
        "run (default: last)",
    )


def _add_manage(commands: Commands) -> None:
    """`doctor` and `history`: looking at what the server holds."""
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


def _add_server(commands: Commands) -> None:
    """`server start|status|stop`: the kept local server of the embedded default."""
    server = commands.add_parser(
        "server",
        help="start, show or stop the local Prefect server that runs keep (no PREFECT_API_URL)",
    )
    actions = server.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = actions.add_parser(
        "start",
        help="start it (or reuse it) and print where its UI is; it stays until `server stop` "
        "(--idle SECONDS: that long instead)",
        allow_abbrev=False,
    )
    start.add_argument(
        "--idle",
        type=_positive_int,
        metavar="SECONDS",
        help="stay this long instead, then stop once no run is on it",
    )
    actions.add_parser(
        "status", help="the local server of this PREFECT_HOME, if one is up", allow_abbrev=False
    )
    actions.add_parser("stop", help="stop it now", allow_abbrev=False)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, its commands in the order `--help` lists them."""
    parser = argparse.ArgumentParser(
        prog="site-pipeline",
        description="Run a per-site pipeline over many sites with Prefect: retries, "
        "timeouts that stop the process group, and a global concurrency cap.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_setup, _add_submit, _add_manage, _add_server):
        add(commands)
    # No abbreviations: `--sites x` must not quietly mean `--sites-file x`, and a script's
    # abbreviation must not change meaning when an option is added.
    for sub in (parser, *commands.choices.values()):
        sub.allow_abbrev = False
    return parser
