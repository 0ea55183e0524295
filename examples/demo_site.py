"""A DEMO pipeline that stands in for `universal_recon.main`, so `site-pipeline run` works anywhere.

It takes the site and the attempt, sleeps a little, writes a file into the
site's output folder and prints a JSON status line (what `--emit-status` would
print). The site `flaky.example` fails its first attempt, so a retry shows.
"""

import argparse
import json
import os
import pathlib
import random
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description="demo site pipeline")
    parser.add_argument("--site", required=True)
    parser.add_argument("--attempt", type=int, default=1)
    parser.add_argument("--schema-matrix", action="store_true")
    parser.add_argument("--emit-status", action="store_true")
    args = parser.parse_args()

    print(f"scraping {args.site} (attempt {args.attempt})", flush=True)
    time.sleep(0.5 + random.random())  # noqa: S311 - a demo's pretend work
    if args.site == "flaky.example" and args.attempt == 1:
        print(f"{args.site}: connection reset (demo failure on attempt 1)", file=sys.stderr)
        return 1
    out_dir = pathlib.Path(os.environ.get("SITE_OUTPUT_DIR", "."))
    (out_dir / "records.json").write_text(json.dumps({"site": args.site, "records": 3}) + "\n")
    if args.emit_status:
        print(json.dumps({"site": args.site, "records": 3, "attempt": args.attempt}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
