"""`site-pipeline run`: run the flow here, with the live view on a terminal, then print the
results; `--retry-failed` first resolves the earlier run it resumes."""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from flows.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Connection,
    connect,
    fail,
    interrupted,
    retry_or_fail,
)
from flows.config import (
    ConfigError,
    ConfigFiles,
    PipelineConfig,
    RunPlan,
    make_plan,
)

if TYPE_CHECKING:
    from rich.console import Console

    from flows.cli.console import Verbosity
    from flows.dask_cluster import LocalDaskCluster
    from flows.interrupts import StopRequest


def retry_failed(args: argparse.Namespace) -> int:
    """`run --retry-failed REF`: run again, here, the sites of REF that did not succeed. Each
    config file is read once: the one given (or found) now and the earlier run's are mostly
    the same file."""
    if args.site or args.sites_file:
        fail(
            "--retry-failed and --site/--sites-file: expected one or the other; "
            "--retry-failed takes the sites of the run it resumes"
        )
    configs = ConfigFiles()
    connection = connect(_local_server_idle(args, configs), run=True)
    if connection is None:
        return EXIT_FAILED
    plan, skip = _retry_plan(args, configs)
    return run_plan(args, plan, skip, connection)


def _local_server_idle(args: argparse.Namespace, configs: ConfigFiles) -> float:
    """`local_server_idle` of the config `--retry-failed` starts from (the earlier run's may
    differ; it is read once the API answers): the default where it can't be read here."""
    try:
        return configs.read(args.config).config.local_server_idle
    except ConfigError:
        return float(PipelineConfig.model_fields["local_server_idle"].default)


def _retry_plan(args: argparse.Namespace, configs: ConfigFiles) -> tuple[RunPlan, dict[str, str]]:
    """The plan and the `skip` of `run --retry-failed REF`: the earlier run's sites, config
    and overrides (a flag given now wins). Exits 2 when REF names no run, or one that may
    still be running."""
    retry = retry_or_fail(args.retry_failed, configs)
    params = retry.earlier.parameters
    config_path = args.config or params.get("config_path")
    cap = args.max_concurrent or params.get("max_concurrent_sites")
    use_async = False if args.sequential else params.get("use_async")
    try:
        plan = make_plan(
            configs.read(config_path if isinstance(config_path, str) else None),
            sites=list(retry.earlier.sites),
            max_concurrent_sites=cap if isinstance(cap, int) else None,
            use_async=use_async if isinstance(use_async, bool) else None,
        )
    except ConfigError as exc:
        fail(str(exc))
    for line in retry.announcement():
        print(line)
    return plan, retry.choice.skip


def run_plan(
    args: argparse.Namespace,
    plan: RunPlan,
    skip: dict[str, str] | None = None,
    connection: Connection | None = None,
) -> int:
    """`run`: the flow on the configured API (or the local server), then the results.
    The first Ctrl-C (or SIGTERM) cancels politely; a second one stops every pipeline now.
    A local Dask cluster starts first, before Prefect is imported and the API checked, so it
    is ready by the time the flow run is (`flows.dask_cluster`); it is closed on the way out.
    `connection`: the command's, when it connected already (`--retry-failed`)."""
    if skip is not None and len(skip) == len(plan.sites):
        print("nothing to retry: every site succeeded")
        return EXIT_OK
    from flows.dask_cluster import local_cluster

    with local_cluster(plan) as cluster:
        return _run_plan(args, plan, skip, cluster, connection)


def _run_plan(
    args: argparse.Namespace,
    plan: RunPlan,
    skip: dict[str, str] | None,
    cluster: LocalDaskCluster | None,
    connection: Connection | None,
) -> int:
    from prefect.settings import get_current_settings
    from rich.console import Console

    from flows.interrupts import StopRequest, exit_status, on_signals
    from flows.process.control import stop_everything

    err = Console(stderr=True)
    stop = StopRequest()

    def notice(text: str) -> None:
        err.print(f"site-pipeline: {text}", highlight=False, markup=False)

    # Before the flow run exists there is nothing to cancel politely: the first signal ends
    # the start (the kept server goes on, for its idle time).
    try:
        with on_signals(stop, notice, polite=False):
            connection = connection or connect(plan.config.local_server_idle, run=True)
            if connection is None:
                return EXIT_FAILED
    except KeyboardInterrupt:
        return interrupted(exit_status(stop.signal))
    # Dask workers can't see a stop request: there the first signal stops at once.
    polite = plan.config.task_runner.kind == "threads"
    with on_signals(stop, notice, polite=polite):
        settings = get_current_settings()  # with the kept local server's URL, if one is used
        verbosity: Verbosity = "verbose" if args.verbose else "quiet" if args.quiet else "normal"
        try:
            outcome = _watch_flow(plan, skip, stop, verbosity, err, cluster)
        except ServerGone as gone:  # the kept server died: end now, stating what to do next
            _end_for_server_gone(plan, gone)
        except KeyboardInterrupt:  # a second signal (or a first one on Dask): stop at once
            stop_everything(plan.config.process_control, 0)  # at once: no grace
            status = interrupted(exit_status(stop.signal))
            if polite:  # threads: one may sleep in a retry delay (on Dask, the cluster closes)
                end_now(status)
            return status
        if isinstance(outcome, BaseException):
            return _run_failed(outcome)
    # A server that keeps running (not one that stops with this run): link to the run.
    server = connection.server
    stops = (server is not None and server.stops_with_us()) or not settings.api.url
    ui_url = str(settings.ui_url) if not stops and settings.ui_url else None
    _print_results(args, outcome, ui_url)
    if stops:
        for line in server_gone(outcome["flow_run_id"]):
            print(line)
    if outcome["state"] == "Cancelled" and stop.signal is not None:
        end_now(exit_status(stop.signal))
    return EXIT_OK if outcome["state"] == "Completed" else EXIT_FAILED


def _end_for_server_gone(plan: RunPlan, gone: ServerGone) -> NoReturn:
    """The kept server died mid-run: stop the pipelines, say what to do next, exit 1 at once
    (the flow's thread waits on API retries: it is not joined)."""
    from flows.process.control import stop_everything

    print(f"site-pipeline: error: {gone}", file=sys.stderr)
    stop_everything(plan.config.process_control, plan.config.kill_grace_seconds)
    print(
        "site-pipeline: its pipelines were stopped. The next run starts a new server "
        "and gives their slots back; `site-pipeline doctor --fix` marks this run "
        "Crashed, and `site-pipeline run --retry-failed` runs its unfinished sites",
        file=sys.stderr,
    )
    end_now(EXIT_FAILED)


def _run_failed(outcome: BaseException) -> int:
    """The exit status of a run that raised: a refused run (`PipelineRunError`) or an API
    failure is one line and exit 1; anything else propagates."""
    from flows.api import PipelineRunError

    if isinstance(outcome, PipelineRunError):
        print(f"site-pipeline: {outcome}", file=sys.stderr)
        return EXIT_FAILED
    if (line := api_failure(outcome)) is not None:
        print(f"site-pipeline: error: {line}", file=sys.stderr)
        return EXIT_FAILED
    raise outcome


def server_gone(flow_run_id: str) -> list[str]:
    """The last lines of a run on a local server that stops with it (`local_server_idle: 0`):
    no link of it works now; how to see the run again."""
    return [
        f"flow run: {flow_run_id} (its local Prefect server stops with the run)",
        "  to see it in the UI: `site-pipeline server start` prints the UI's address; the run "
        f"is at <UI>/runs/flow-run/{flow_run_id}",
    ]


def end_now(status: int) -> NoReturn:
    """End the process with `status` now that the stopped run's summary is out. Python's exit
    would first join the task runner's threads (`concurrent.futures` joins them at exit, daemon
    or not), and one may sleep through the rest of a retry delay in Prefect's task engine:
    nothing wakes a `time.sleep`. So Prefect's queued log lines are sent, and the process
    ends without waiting for it (the kept server counts a command whose process is gone as
    ended, and stops a server that has no idle time)."""
    from prefect.logging.handlers import APILogHandler

    try:
        APILogHandler().flush()  # the run's last lines reach the server
    except Exception:  # noqa: S110 - no API left to send them to: the exit goes on
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def api_failure(exc: BaseException) -> str | None:
    """One line for a Prefect API call that failed under the flow run (the server, or a
    backend of it such as Redis, down as the run ended): the status and the request, which
    names the server; None for any other exception (a bug: its traceback is worth seeing)."""
    import httpx

    from flows.slots.prefect_api import describe_api_error

    what = describe_api_error(exc)
    if what is None:
        return None
    if isinstance(exc, httpx.HTTPStatusError):
        return f"the Prefect API failed: {what}; the flow run may be left Running on that server"
    return f"the Prefect API could not be reached: {what}"


def _watch_flow(
    plan: RunPlan,
    skip: dict[str, str] | None,
    stop: StopRequest,
    verbosity: Verbosity,
    err: Console,
    cluster: LocalDaskCluster | None,
) -> dict[str, Any] | BaseException:
    """Run the flow in a thread of its own while the console (and live view) shows it; the
    summary, or what the flow raised (for the main thread to handle)."""
    from flows.api import run_pipeline_summary
    from flows.cli.console import run_console
    from flows.ops.server import watch_kept_server

    outcome: list[dict[str, Any] | BaseException] = []

    def flow_thread(on_progress: Callable[[int, int, int], None] | None) -> None:
        try:
            outcome.append(
                run_pipeline_summary(
                    plan.flow_sites(),
                    config_path=plan.config_path,
                    max_concurrent_sites=plan.max_concurrent_sites,
                    use_async=plan.use_async,
                    on_progress=on_progress,
                    skip=skip,
                    stop=stop,
                    cluster=cluster,
                    plan=plan,  # loaded and checked once, by the command: not read again
                )
            )
        except BaseException as exc:  # re-raised in the main thread
            outcome.append(exc)

    # The flow runs in a thread of its own: Prefect's engine sets its own SIGTERM handler
    # when it runs in the main thread, and ours must see the signal to cancel politely. It
    # runs in a copy of this thread's context: Prefect's settings context (the kept local
    # server's URL, `flows.ops.server.use_local_server`) is a context variable.
    with run_console(len(plan.sites), verbosity, err) as view:
        runner = threading.Thread(
            target=contextvars.copy_context().run,
            args=(flow_thread, view.site_done if view is not None else None),
            name="site-pipeline-flow",
            daemon=True,
        )
        runner.start()
        server_gone = watch_kept_server()
        while runner.is_alive():
            runner.join(0.5)
            if runner.is_alive() and (what := server_gone()) is not None:
                raise ServerGone(what)
    return outcome[0]


class ServerGone(Exception):
    """The kept local server ended during the run (`flows.ops.server.watch_kept_server`)."""


def _print_results(args: argparse.Namespace, summary: dict[str, Any], ui_url: str | None) -> None:
    """The final table (rich on a terminal, plain elsewhere), one line per failure cause
    (`2 sites: <cause> (a, b)`), the summary JSON if asked for, and the link to the flow run
    in the UI when there is one."""
    from rich.console import Console

    from flows.cli.console import summary_table
    from flows.failure_causes import cause_lines_of
    from flows.report import count_line, format_table

    out = Console()
    if out.is_terminal:
        out.print(summary_table(summary, out.width))
        print(count_line(summary))
    else:
        print(format_table(summary))
    for line in cause_lines_of(summary):
        print(line)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"summary: {args.summary_json}")
    if ui_url:
        print(f"flow run: {ui_url.rstrip('/')}/runs/flow-run/{summary['flow_run_id']}")
