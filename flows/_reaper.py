"""Kill the pipeline process groups of a parent that died without cleaning up.

Started by `procgroup` in a session of its own. It reads lines `+PGID` and
`-PGID` on stdin; at end of file (the parent exited, however it exited) it
sends SIGTERM to every group still registered, then SIGKILL 5 seconds later.
Runs with `python -I`, so it imports nothing from the project.
"""

import os
import signal
import sys
import time


def main() -> None:
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line[:1] == "+":
            groups.add(int(line[1:]))
        elif line[:1] == "-":
            groups.discard(int(line[1:]))
    for sig, pause in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except OSError:
                pass
        if groups and pause:
            time.sleep(pause)


if __name__ == "__main__":
    main()
