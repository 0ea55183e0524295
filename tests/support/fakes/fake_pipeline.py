"""A fake site pipeline for tests. Its behaviour is chosen by the site name's prefix.

    ok...        sleep $FAKE_SLEEP seconds (default 0.05), print a JSON status line
    slow...      like ok, but sleep $FAKE_SLOW seconds (default 3)
    flaky...     fail attempt 1 (exit 1), succeed after
    fail...      always exit 1 with a line on stderr
    usage...     exit 2, like an argparse usage error
    hang...      start a grandchild, then both sleep for ever
    stubborn...  like hang, but the pipeline ignores SIGTERM
    loud...      print $FAKE_LOUD_MB megabytes (default 20) of lines, then the status line
    anything else behaves like ok
    any site named by $FAKE_HANG behaves like hang (for a site that hangs after good runs)
    with $FAKE_WAIT_FOR=<site>, every other site first waits (up to 60 s) until that site has
    started in $FAKE_TIMELINE (an order a test needs, without betting on a sleep)

The JSON status line holds `records` = $FAKE_RECORDS when set, the argv, the SITE*
environment, the cwd and the parent pid.
Every run appends `<site> start|end <time>` lines to $FAKE_TIMELINE when set, and
`hang`/`stubborn` write their pids to $FAKE_PIDS_DIR/<attempt>-<pid>.pids.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def mark(site: str, what: str) -> None:
    path = os.environ.get("FAKE_TIMELINE")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{site}\t{what}\t{time.time():.6f}\n")


def wait_for_start(site: str) -> None:
    """Return once `site` has a start line in $FAKE_TIMELINE (or after 60 s)."""
    path = os.environ["FAKE_TIMELINE"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                if f"{site}\tstart\t" in handle.read():
                    return
        time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", required=True)
    parser.add_argument("--attempt", type=int, default=int(os.environ.get("SITE_ATTEMPT", "1")))
    args, extra = parser.parse_known_args()
    site = args.site
    mark(site, "start")
    waits_for = os.environ.get("FAKE_WAIT_FOR")
    if waits_for and waits_for != site:
        wait_for_start(waits_for)
    status = {
        "site": site,
        "attempt": args.attempt,
        "argv": sys.argv[1:],
        "extra": extra,
        "env_site": os.environ.get("SITE"),
        "env_attempt": os.environ.get("SITE_ATTEMPT"),
        "env_flow_run_id": os.environ.get("SITE_FLOW_RUN_ID"),
        "output_dir": os.environ.get("SITE_OUTPUT_DIR"),
        "cwd": os.getcwd(),
        "ppid": os.getppid(),  # which process ran this pipeline (the flow's, or a Dask worker)
        "pid": os.getpid(),
        "pgid": os.getpgid(0) if hasattr(os, "getpgid") else None,  # leads its group?
    }
    if site.startswith(("hang", "stubborn")) or os.environ.get("FAKE_HANG") == site:
        if site.startswith("stubborn"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        pids_dir = os.environ.get("FAKE_PIDS_DIR", ".")
        with open(os.path.join(pids_dir, f"{args.attempt}-{os.getpid()}.pids"), "w") as handle:
            handle.write(f"{os.getpid()} {child.pid}\n")
        print("hanging", flush=True)
        time.sleep(1000)
        return 0
    slow = site.startswith("slow")
    time.sleep(
        float(os.environ.get("FAKE_SLOW", "3") if slow else os.environ.get("FAKE_SLEEP", "0.05"))
    )
    if site.startswith("flaky") and args.attempt == 1:
        print(f"{site}: failing attempt 1 on purpose", file=sys.stderr)
        mark(site, "end")
        return 1
    if site.startswith("fail"):
        print(f"{site}: boom on attempt {args.attempt}", file=sys.stderr)
        mark(site, "end")
        return 1
    if site.startswith("usage"):
        print("usage: fake_pipeline --site SITE", file=sys.stderr)
        mark(site, "end")
        return 2
    if site.startswith("loud"):
        line = "x" * 99 + "\n"
        megabytes = float(os.environ.get("FAKE_LOUD_MB", "20"))
        chunk = line * 10_000  # about 1 MB
        for _ in range(int(megabytes)):
            sys.stdout.write(chunk)
    if os.environ.get("FAKE_RECORDS"):  # for result checks: {"records": N, "stats": {...}}
        status["records"] = int(os.environ["FAKE_RECORDS"])
    print(json.dumps(status), flush=True)
    mark(site, "end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
