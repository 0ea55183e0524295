"""Linux's `/proc/<pid>/stat`, read in one place (plain Python).

The command name, field 2, is in parentheses and may hold spaces and ')' itself, so the
fields are counted from the last ')'. The reaper (`_reaper.py`) keeps its own copy on
purpose: it runs with `python -I` and imports nothing from the project.
"""

from __future__ import annotations

import os

STATE, PPID, PGRP = 0, 1, 2  # indexes into `stat_fields`: fields 3, 4 and 5 of the file
START_TIME = 19  # field 22: the start time, in clock ticks since boot


def stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields after the command name (field 3 onwards), or None where the process is
    gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def start_time(pid: int) -> str:
    """The process's start time as the reaper reads it, so it never signals a pid that was
    reused by another process; "" where there is no /proc (or no such process)."""
    fields = stat_fields(pid)
    return fields[START_TIME].decode() if fields and len(fields) > START_TIME else ""


def children_map() -> dict[int, list[int]] | None:
    """Every process's children by parent pid, from one pass over /proc (Linux); None where
    there is no /proc. One pass serves a whole tree: psutil's `children(recursive=True)`
    makes that pass once per parent asked."""
    try:
        entries = os.scandir("/proc")
    except OSError:
        return None
    children: dict[int, list[int]] = {}
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            fields = stat_fields(entry.name)
            if fields is not None and len(fields) > PPID:
                children.setdefault(int(fields[PPID]), []).append(int(entry.name))
    return children
