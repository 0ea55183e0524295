"""A benchmark site: append `<site> start <t>`, sleep, append `<site> end <t>`.

Usage: sleep_site.py SITE [--attempt N]. $BENCH_TIMELINE is the file. The seconds are the
site's entry in the JSON object `{site: seconds}` of the file $BENCH_DURATIONS names (the
heterogeneous night), else $BENCH_SLEEP (default 2). A site named `flaky*` exits 1 on
attempt 1 (the retry scenario).
"""

import json
import os
import sys
import time


def mark(site: str, what: str) -> None:
    # One short write with O_APPEND: lines from concurrent sites never interleave.
    with open(os.environ["BENCH_TIMELINE"], "a", encoding="utf-8") as handle:
        handle.write(f"{site}\t{what}\t{time.time():.6f}\n")


def seconds(site: str) -> float:
    """This site's sleep: its entry in $BENCH_DURATIONS' file, else $BENCH_SLEEP."""
    durations = os.environ.get("BENCH_DURATIONS")
    if durations:
        with open(durations, encoding="utf-8") as handle:
            own = json.load(handle).get(site)
        if own is not None:
            return float(own)
    return float(os.environ.get("BENCH_SLEEP", "2"))


def main() -> int:
    site = sys.argv[1]
    attempt = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--attempt" else 1
    mark(site, "start")
    time.sleep(seconds(site))
    mark(site, "end")
    return 1 if site.startswith("flaky") and attempt == 1 else 0


if __name__ == "__main__":
    sys.exit(main())
