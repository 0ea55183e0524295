"""What the CLI asks of the Prefect server, besides running the flow.

- `server`: which API, whether it answers, the embedded default's local server;
- `provision`: `setup`: the work pool, the concurrency limit, the notifications (`notify`);
- `run_history`: `history`, the last runs and each site's last status;
- `resume`: the earlier run `--retry-failed` resumes, and which sites it runs again;
- `checkup`: `doctor`, slots and flow runs left behind by dead processes;
- `queries`: the reads those share.

The names below are re-exported here, each loaded on first use: importing `flows.ops` (or
the plain `flows.ops.resume`, which the CLI's start imports) loads no Prefect. No module is
named like a function it exports: loading a module sets the package's attribute of its
name, which would then hide the function (`flows.ops.history` is the function).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.ops.checkup import doctor
    from flows.ops.provision import setup
    from flows.ops.resume import EarlierRun, RetryChoice, choose, earlier_run, mark_crashed
    from flows.ops.run_history import format_history, history, history_rows
    from flows.ops.server import (
        ApiUnreachable,
        api_target,
        api_url_unset,
        check_reachable,
        use_local_server,
    )

_HOME = {
    "ApiUnreachable": "server",
    "api_target": "server",
    "check_reachable": "server",
    "api_url_unset": "server",
    "use_local_server": "server",
    "setup": "provision",
    "history": "run_history",
    "history_rows": "run_history",
    "format_history": "run_history",
    "EarlierRun": "resume",
    "RetryChoice": "resume",
    "choose": "resume",
    "earlier_run": "resume",
    "mark_crashed": "resume",
    "doctor": "checkup",
}
"""Each re-exported name -> the module of `flows.ops` it lives in."""

__all__ = [
    "ApiUnreachable",
    "EarlierRun",
    "RetryChoice",
    "api_target",
    "api_url_unset",
    "check_reachable",
    "choose",
    "doctor",
    "earlier_run",
    "format_history",
    "history",
    "history_rows",
    "mark_crashed",
    "setup",
    "use_local_server",
]


def __getattr__(name: str) -> Any:
    """Load a re-exported name from its module on first use (PEP 562)."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
