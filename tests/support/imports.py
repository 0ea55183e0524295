"""What importing a module loads, asked of a fresh interpreter (the plain layer must not load
Prefect or Dask: tests/project/test_boundaries.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HEAVY = ("prefect", "distributed", "dask", "prefect_dask")


def loaded_heavy(module: str) -> list[str]:
    """The heavy packages that importing `module` loads, in a fresh interpreter."""
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()
