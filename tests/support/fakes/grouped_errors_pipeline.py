"""A fake site pipeline whose failures group by cause. Behaviour by the site name's prefix:

pyerr...    log a line on stderr, then `import nopkg_grouped`: a real ModuleNotFoundError
            traceback, exit 1 (every such site: the same cause)
chained...  a KeyError handled by raising `RuntimeError: worker <pid> gave up`: a chained
            traceback, exit 1 (the cause differs per site only in a number)
anything else: a JSON status line, exit 0
"""

import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", required=True)
    args, _ = parser.parse_known_args()
    print(f"{args.site}: starting", file=sys.stderr, flush=True)
    if args.site.startswith("pyerr"):
        import nopkg_grouped  # type: ignore[import-not-found]  # noqa: F401
    if args.site.startswith("chained"):
        try:
            {}["session"]
        except KeyError:
            raise RuntimeError(f"worker {os.getpid()} gave up")  # noqa: B904 (chained on purpose)
    print(json.dumps({"site": args.site}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
