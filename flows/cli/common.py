"""What every `site-pipeline` command shares: the exit statuses, the one-line usage error,
the API check, the run plan from the command line, `--retry-failed`'s earlier run, and the
one answer to Ctrl-C."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from flows.config import ConfigError, ConfigFiles, RunPlan, check_sites, load_plan, read_sites_file

if TYPE_CHECKING:
    from flows.ops.local_server import ServerUse
    from flows.ops.resume import Retry

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's status for SIGINT, when no signal is known


def fail(message: str) -> NoReturn:
    """Bad usage or config: one `error:` line per line of `message`, then exit 2."""
    for line in message.splitlines():
        print(f"site-pipeline: error: {line}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def interrupted(status: int = EXIT_INTERRUPTED) -> int:
    """Say, in one line and no traceback, that Ctrl-C stopped the pipelines; `status`."""
    print("site-pipeline: interrupted; pipelines stopped", file=sys.stderr)
    return status


def interruptible(command: Callable[[], int]) -> int:
    """`command()`'s status, or 130 and one line when a KeyboardInterrupt reaches here."""
    try:
        return command()
    except KeyboardInterrupt:
        return interrupted()


@dataclass(frozen=True)
class Connection:
    """The API a command uses: `target` describes it; `server` is the embedded default's
    local server this command uses (`flows.ops.local_server`), or None on a configured URL."""

    target: str
    server: ServerUse | None


def connect(keep: float | None = None, run: bool = False) -> Connection | None:
    """Every command that uses the API starts here: check that it answers; on the embedded
    default, use the local server (`flows.ops.local_server`: a run, `run=True`, finds or
    starts it and keeps it `keep` seconds after it ends; other commands, and a run with
    `keep` 0, use one that is up, or start one that stops as soon as they end, however they
    end: its keeper sees their process gone; left to Prefect, a temporary server would
    outlive a process killed by a signal or a broken pipe). The connection, or None once
    the reason is printed (one `error:` line; a server that died adds its log's last lines,
    indented). Called once per command: the connection is handed on from there."""
    from flows import ops

    try:
        use = ops.use_local_server(keep if run else None)
        if use is not None:
            print(f"site-pipeline: {use.describe()}", file=sys.stderr)
        target = ops.check_reachable()
    except ops.ApiUnreachable as exc:
        first, *rest = str(exc).splitlines() or [""]
        print(f"site-pipeline: error: {first}", file=sys.stderr)
        for line in rest:
            print(f"  {line}", file=sys.stderr)
        return None
    return Connection(target, use)


def plan_from_args(args: argparse.Namespace) -> RunPlan:
    """The plan of `run`, `validate` or `setup`: the config, with the sites and overrides
    given on the command line. Raises `ConfigError`."""
    sites: list[str] | None = args.site if getattr(args, "site", None) else None
    sites_file = getattr(args, "sites_file", None)
    if sites and sites_file:
        fail("--site and --sites-file: expected one or the other, not both")
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


def retry_or_fail(ref: str, configs: ConfigFiles | None = None) -> Retry:
    """`--retry-failed REF` of `run` and `submit` (`flows.ops.resume.find_retry`): the earlier
    run and which of its sites run again; what was done to the run is printed. Exits 2 when
    REF names no run, or one that may still be running."""
    from flows.ops import resume

    try:
        retry = resume.find_retry(ref, configs)
    except ConfigError as exc:
        fail(str(exc))
    for line in retry.notes:
        print(line)
    return retry
