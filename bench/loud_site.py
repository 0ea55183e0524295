"""A benchmark site for bench/output_speed.py: print a lot, or a little over time.

Usage: loud_site.py --lines N     N lines of 100 bytes on stdout (N=200000: 20 MB), one
                                  print() each as a real pipeline does, then a JSON line;
       loud_site.py --quiet S     a short line every 10 ms for S seconds, then the status line.
"""

import argparse
import json
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=0)
    parser.add_argument("--quiet", type=float, default=0.0)
    args = parser.parse_args()
    line = "x" * 92
    for n in range(args.lines):
        print(f"{n % 1_000_000:06d}", line)
    until = time.monotonic() + args.quiet
    while time.monotonic() < until:
        print("working", flush=True)
        time.sleep(0.01)
    print(json.dumps({"lines": args.lines, "quiet": args.quiet}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
