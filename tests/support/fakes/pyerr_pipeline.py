"""A fake site pipeline that fails the way a broken deploy does: a real Python exception.

    pyerr...    import a module that does not exist: a real ModuleNotFoundError traceback
    anything else behaves like fake_pipeline.py's `ok`: a JSON status line

Every run appends `<site> start <time>` to $FAKE_TIMELINE when set (like fake_pipeline.py).
"""

import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", required=True)
    args, _ = parser.parse_known_args()
    path = os.environ.get("FAKE_TIMELINE")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{args.site}\tstart\t{time.time():.6f}\n")
    if args.site.startswith("pyerr"):
        import nopkg_site_pipeline_fake  # type: ignore[import-not-found]  # noqa: F401
    print(json.dumps({"site": args.site}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
