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

from flows import procgroup
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

    with_config(
        commands.add_parser("validate", help="check the config and sites; show what would run")
    )
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
    from flows.site_pipeline import progress_listeners, run_sites

    bar = _ProgressBar() if sys.stdout.isatty() else None
    if bar is not None:
        progress_listeners.append(bar.update)
    try:
        state = run_sites(
            sites=list(plan.sites),
            config_path=str(plan.config_path),
            max_concurrent_sites=plan.max_concurrent_sites,
            use_async=plan.use_async,
            return_state=True,
        )
    finally:
        if bar is not None:
            progress_listeners.remove(bar.update)
            bar.done()
    summary: Any = state.result(raise_on_failure=False)
    if not isinstance(summary, dict):
        print(f"site-pipeline: the flow run ended {state.name}: {state.message}", file=sys.stderr)
        return EXIT_FAILED
    from flows.report import format_table

    print(format_table(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return EXIT_OK if summary["state"] == "Completed" else EXIT_FAILED


class _ProgressBar:
    """A one-line progress bar for terminals."""

    def update(self, done: int, total: int, failed: int) -> None:
        width = 30
        filled = int(width * done / total) if total else width
        sys.stdout.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} sites, {failed} failed "
        )
        sys.stdout.flush()

    def done(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        procgroup.ensure_supported()
        plan = _plan(args)
    except (ConfigError, procgroup.UnsupportedPlatform) as exc:
        _fail(str(exc))
    for warning in plan.warnings:
        print(f"site-pipeline: warning: {warning}", file=sys.stderr)
    if args.command == "validate":
        return _validate(plan)
    try:
        return _run(args, plan)
    except KeyboardInterrupt:
        print("site-pipeline: interrupted; pipelines stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
