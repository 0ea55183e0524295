"""`site-pipeline`: run, validate and manage the site pipeline from a terminal.

This package is the command line and nothing else: it parses (`parser`), dispatches to one
function per command (`run`: run here; `validate`; `manage`: setup, submit, doctor,
history, server), and turns what they return into exit statuses and messages (`common`). The work
itself lives elsewhere (`flows.api`, `flows.ops`). Prefect loads only once a command needs
it, so bad usage exits fast.

Exit status: 0 every site succeeded, 1 some site did not, 2 bad usage or config, 128 + N
stopped by signal N (130 for Ctrl-C).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flows.cli import manage, run, validate
from flows.cli.common import fail, interruptible, plan_from_args
from flows.cli.manage import deployment_parameters
from flows.cli.parser import build_parser
from flows.config import ConfigError

__all__ = ["deployment_parameters", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the process's arguments), run the command, return its status."""
    args = build_parser().parse_args(argv)
    if args.command == "history":
        return manage.history(args)
    if args.command == "submit":
        return manage.submit(args)
    if args.command == "doctor":
        return manage.doctor(args)
    if args.command == "server":
        return manage.server(args)
    if args.command == "run" and args.retry_failed:
        return interruptible(lambda: run.retry_failed(args))
    try:
        plan = plan_from_args(args)
    except ConfigError as exc:
        fail(str(exc))
    for warning in plan.warnings:
        print(f"site-pipeline: warning: {warning}", file=sys.stderr)
    if args.command == "validate":
        return validate.validate(plan)
    if args.command == "setup":
        return manage.setup(args, plan)
    return interruptible(lambda: run.run_plan(args, plan))
