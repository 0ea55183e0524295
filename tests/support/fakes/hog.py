"""A fake site pipeline that uses memory and CPU: the memory_limit and usage tests' browser.

    hog.py --site S [--mb N] [--child-mb M] [--child-burn SECONDS] [--burn SECONDS]
                    [--hold SECONDS] [--ignore-term]

With `--child-mb` or `--child-burn` it first starts a child (this script again) that takes
M MB, burns SECONDS of CPU and then, with memory, holds it as long as the parent does;
without memory, it exits at once and the parent reaps it. Then it takes N MB itself
(written, so resident, not only reserved), burns `--burn` seconds of CPU, prints `holding`,
sleeps `--hold` seconds, waits for its child and prints a JSON status line (with its own
CPU seconds, `cpu_s`).
`--ignore-term`: SIGTERM does nothing.

As soon as its child has started it writes `<pid> <child pid>` to $HOG_PIDS_DIR/<pid>.pids
(when set), so a test can check that no process is left: before it takes its memory, which
may pass a test's memory_limit and stop it at once.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

MB = 1024 * 1024


def burn(seconds: float) -> None:
    """Spend `seconds` of CPU time (user time: a busy loop)."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        sum(range(1000))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", required=True)
    parser.add_argument("--mb", type=float, default=0)
    parser.add_argument("--child-mb", type=float, default=0)
    parser.add_argument("--child-burn", type=float, default=0)
    parser.add_argument("--burn", type=float, default=0)
    parser.add_argument("--hold", type=float, default=0)
    parser.add_argument("--ignore-term", action="store_true")
    args, _ = parser.parse_known_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = None
    if args.child_mb or args.child_burn:
        argv = [sys.executable, __file__, "--site", f"{args.site}-child"]
        argv += ["--mb", str(args.child_mb), "--burn", str(args.child_burn)]
        argv += ["--hold", str(args.hold if args.child_mb else 0)]
        child = subprocess.Popen([*argv, *(["--ignore-term"] if args.ignore_term else [])])
        if not args.child_mb:  # a child that only burns CPU: gone (reaped) before we go on
            child.wait()
    folder = os.environ.get("HOG_PIDS_DIR")
    if folder and child is not None:
        with open(os.path.join(folder, f"{os.getpid()}.pids"), "w", encoding="utf-8") as out:
            out.write(f"{os.getpid()} {child.pid}\n")
    held = b"\x01" * int(args.mb * MB)  # written: every page resident
    burn(args.burn)
    print("holding", flush=True)
    time.sleep(args.hold)
    if child is not None:
        child.wait()
    cpu = time.process_time()  # this process's own CPU seconds, all of them
    print(json.dumps({"site": args.site, "held_mb": len(held) // MB, "cpu_s": cpu}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
