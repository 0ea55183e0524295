"""The soak night's pipeline (bench/soak.py): one script that plays the site's fault.

Usage: soak_site.py SITE --attempt N --marker M
       soak_site.py --linger M            (a grandchild or a background process: sleeps long)

The fault and the seconds come from the plan file $SOAK_PLAN, `{site: {"kind", "seconds"}}`:

- `ok`: sleep the seconds, exit 0;
- `fail_first`: attempt 1 exits 1 after a tenth of the seconds, later attempts are `ok`;
- `hang`: start a grandchild that lingers, then print a line a second forever (never a stall,
  always a timeout);
- `ignore_term`: ignore SIGTERM, print a line a second forever (killed after kill_grace);
- `flood`: print 10 MB in 100-byte lines and exit 0 (no sleep: the write is its work);
- `stall`: print nothing and sleep forever (the stall timeout stops it);
- `leave_bg`: start a detached process (a session of its own) that lingers, run on for the
  seconds (at least 1.5 s, so the product's 0.2 s watch sees it even on a loaded machine),
  exit 0.

Every kind but `stall` prints a line when it starts, so a slow start under load is no stall.

Every attempt writes its own record file in $SOAK_RECORDS, `<site>~<attempt>~<pid>.jsonl`:
a start line `{"site", "attempt", "pid", "kind", "start"}`, a line per process it started
(`{"child": pid, "detached": bool}`), and an end line `{"end", "exit"}` unless it was killed.
The marker M is in every process's argv (and the product passes $SOAK_MARKER in the
environment), so the bench can find whatever is left.
"""

import json
import os
import signal
import subprocess
import sys
import time
from typing import TextIO

FLOOD_BYTES = 10_000_000  # 10 MB


def record(handle: TextIO, **fields: object) -> None:
    handle.write(json.dumps(fields) + "\n")
    handle.flush()


def start_linger(marker: str, detached: bool) -> int:
    """Start this script again as a process that sleeps long (in our group, or detached in a
    session of its own); return its pid."""
    argv = [sys.executable, "-I", "-S", os.path.abspath(__file__), "--linger", marker]
    if detached:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    else:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    return child.pid


def heartbeat_forever(site: str) -> None:
    n = 0
    while True:
        print(f"{site}: working {n}", flush=True)
        n += 1
        time.sleep(1)


def main() -> int:
    if sys.argv[1] == "--linger":
        time.sleep(3600)
        return 0
    site, attempt, marker = sys.argv[1], int(sys.argv[3]), sys.argv[5]
    with open(os.environ["SOAK_PLAN"], encoding="utf-8") as plan_file:
        plan = json.load(plan_file)[site]
    kind, seconds = str(plan["kind"]), float(plan["seconds"])
    if kind == "fail_first" and attempt > 1:
        kind = "ok"
    path = os.path.join(os.environ["SOAK_RECORDS"], f"{site}~{attempt}~{os.getpid()}.jsonl")
    with open(path, "a", encoding="utf-8") as handle:
        record(handle, site=site, attempt=attempt, pid=os.getpid(), kind=kind, start=time.time())
        code = 0
        if kind != "stall":  # a healthy site says it started: a loaded start is no stall
            print(f"{site}: attempt {attempt} started", flush=True)
        if kind == "fail_first":
            time.sleep(seconds / 10)
            print(f"{site}: RuntimeError: first attempt fails", file=sys.stderr, flush=True)
            code = 1
        elif kind == "hang":
            record(handle, child=start_linger(marker, detached=False), detached=False)
            heartbeat_forever(site)
        elif kind == "ignore_term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            heartbeat_forever(site)
        elif kind == "stall":
            time.sleep(3600)
        elif kind == "flood":
            line = "x" * 92
            out = sys.stdout
            for n in range(FLOOD_BYTES // 100):
                out.write(f"{n:06d} {line}\n")
            out.flush()
        elif kind == "leave_bg":
            record(handle, child=start_linger(marker, detached=True), detached=True)
            time.sleep(max(1.5, seconds))
        else:
            time.sleep(seconds)
        if code == 0:
            print(json.dumps({"site": site, "attempt": attempt, "kind": kind}), flush=True)
        record(handle, end=time.time(), exit=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
