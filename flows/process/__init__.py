"""One attempt's process tree, in plain Python: start it, read it, time it out, stop it all.

- `attempt`: `run_attempt(argv, ...) -> AttemptOutcome`, one attempt with a real timeout
  (and a stall timeout);
- `output`: both pipes read per chunk, split into lines, logged bounded;
- `cause`: the one line that says why an attempt failed, from the end of its output;
- `logfile`: each attempt's full output on disk, and the pruning of older runs' logs;
- `control`: the `ProcessControl` interface and `control_for(kind)`, with two backends:
  `groups` (POSIX process groups) and `trees` (tracked trees: Windows, and anywhere);
- `_reaper`: the process that stops what we started when we die, even by SIGKILL;
- `holders`: which process runs a flow run, and whether it is still alive.

Nothing here imports Prefect.
"""

from flows.process.attempt import AttemptOutcome, run_attempt
from flows.process.control import ControlKind, ProcessControl, UnsupportedControl, control_for

__all__ = [
    "AttemptOutcome",
    "ControlKind",
    "ProcessControl",
    "UnsupportedControl",
    "control_for",
    "run_attempt",
]
