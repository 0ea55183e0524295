"""Kill the pipeline process groups of a parent that died without cleaning up.

Started by `procgroup` in a session of its own. It reads lines `+PGID:START` and
`-PGID` (process groups) and `+pPID:START` and `-pPID` (single processes of a
tracked tree, `flows.process.trees`) on stdin; at end of file (the parent exited,
however it exited) it sends SIGTERM to every group and process still registered,
then SIGKILL 5 seconds later. Runs with `python -I`, so it imports nothing from
the project. POSIX only: on Windows a Job Object does this job.

START is the process's start time from /proc (Linux). Before each signal the
reaper checks it: a pid now used by another process is left alone. (Without
/proc, as on macOS, that check can't be made.)
"""

import os
import signal
import sys
import time


def start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (the start time), or "" where it can't be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return ""
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else ""


def still_ours(pid: int, start: str) -> bool:
    """False when `pid` now belongs to a process that started at another time."""
    now = start_time(pid)
    return not (start and now and now != start)


def main() -> None:
    if sys.platform == "win32":
        raise SystemExit("the reaper is for POSIX; Windows uses a Job Object")
    groups: dict[int, str] = {}  # pgid -> its leader's start time
    pids: dict[int, str] = {}
    for line in sys.stdin:
        line = line.strip()
        kind, entry = (pids, line[2:]) if line[1:2] == "p" else (groups, line[1:])
        number, _, start = entry.partition(":")
        if line[:1] == "+":
            kind[int(number)] = start
        elif line[:1] == "-":
            kind.pop(int(number), None)
    for sig, pause in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        for pgid, start in groups.items():
            if still_ours(pgid, start):
                try:
                    os.killpg(pgid, sig)
                except OSError:
                    pass
        for pid, start in pids.items():
            if still_ours(pid, start):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        if (groups or pids) and pause:
            time.sleep(pause)


if __name__ == "__main__":
    main()
