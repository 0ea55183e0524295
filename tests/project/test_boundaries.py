"""The import boundary: the plain-Python layer imports without loading Prefect.

Process control, the slot pool, config, backoff, timeouts, checks and the report are plain
Python, tested without a server; the Prefect layer (the flow, the task, the slot pool's API
side, ops) sits above them. Each module is imported in a fresh interpreter, and the test
fails when one of them (or anything it imports) starts to load `prefect` or Dask.
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest

import flows.process
from tests.support.imports import loaded_heavy

ROOT = Path(__file__).resolve().parents[2]

PLAIN = [
    "flows",
    "flows.api",
    "flows.backoff",
    "flows.checks",
    "flows.config",
    "flows.context",
    "flows.dask_cluster",  # starts a run's cluster before Prefect is imported
    "flows.health",
    "flows.interrupts",
    "flows.names",
    "flows.report",
    "flows.failure_causes",
    "flows.timeouts",
    "flows.slots",
    "flows.slots.pool",
    "flows.slots.slot_api",
    "flows.slots.pool_state",
    "flows.slots.hand_out",
    "flows.slots.broker",
    "flows.slots.lease_book",
    "flows.slots.upkeep",
    "flows.slots.hand_out_rule",
    "flows.start_order",
    "flows.slots.ledger",
    "flows.cli",  # the CLI's start: its exit-2 paths must not wait for Prefect to load
    "flows.ops",  # its names load on first use
    "flows.ops.resume",
    "flows.ops.keeper",  # the kept server's keeper (and the files it reads) runs without Prefect
    *sorted(f"flows.process.{m.name}" for m in pkgutil.iter_modules(flows.process.__path__)),
]
"""Every module of `flows/process/` is plain, whatever is added there."""


@pytest.mark.parametrize("module", PLAIN)
def test_a_plain_module_imports_without_prefect_or_dask(module: str) -> None:
    """Importing a plain module (and all it imports) loads neither Prefect nor Dask."""
    assert loaded_heavy(module) == []


def test_the_check_sees_a_module_that_loads_prefect() -> None:
    """The check itself works: the flow module does load Prefect, and it is reported."""
    assert "prefect" in loaded_heavy("flows.site_pipeline")


def test_the_process_package_is_listed_whole() -> None:
    """A new module in flows/process/ is checked too (the list is read from the folder)."""
    names = {m.name for m in pkgutil.iter_modules(flows.process.__path__)}
    assert {"attempt", "output", "control", "groups", "trees", "procfs", "holders"} <= names
