"""A fake site pipeline that fails the way real ones do. Its behaviour is chosen by the site
name's prefix (`--site`, `--attempt` as fake_pipeline.py takes them):

    pyerr...     `import nopkg`: a real ModuleNotFoundError traceback on stderr, exit 1
    importerr... a real `ImportError: cannot import name ...` (from a real module), exit 1
    chained...   a KeyError handled by raising a RuntimeError: a chained traceback, exit 1
    dotted...    a `requests.exceptions.ConnectionError: ...` (a dotted name), exit 1
    ansi...      a coloured error line on stderr, then exit 3
    stall...     print `connecting to $FAKE_HOST` (default db.example), then nothing for ever
    drip...      a line every 0.1 s for $FAKE_DRIP seconds (default 1.5), then a result
    loudboth...  $FAKE_LINES numbered lines (default 5000) on each of stdout and stderr,
                 interleaved (`out N` and `err N`), then the JSON status line
    anything else: the JSON status line, exit 0

Every mode logs a line or two on stderr first, as a real pipeline does, so the cause has to
be found, not just read off the last line.
"""

import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", required=True)
    parser.add_argument("--attempt", type=int, default=1)
    args, _ = parser.parse_known_args()
    site = args.site
    print(f"{site}: starting attempt {args.attempt}", file=sys.stderr, flush=True)
    if site.startswith("pyerr"):
        import nopkg  # type: ignore[import-not-found]  # noqa: F401
    if site.startswith("importerr"):
        from json import save_schema_matrix  # type: ignore[attr-defined]  # noqa: F401
    if site.startswith("chained"):
        try:
            {}["token"]
        except KeyError as exc:
            raise RuntimeError("login failed: no token in the response") from exc
    if site.startswith("dotted"):
        error = type("ConnectionError", (OSError,), {"__module__": "requests.exceptions"})
        raise error("HTTPSConnectionPool(host='example.com', port=443): Max retries exceeded")
    if site.startswith("ansi"):
        print("\x1b[31mERROR\x1b[0m: \x1b[1mthe site said 503\x1b[0m", file=sys.stderr)
        return 3
    if site.startswith("stall"):
        print(f"connecting to {os.environ.get('FAKE_HOST', 'db.example')}", flush=True)
        time.sleep(1000)
    if site.startswith("drip"):
        until = time.monotonic() + float(os.environ.get("FAKE_DRIP", "1.5"))
        while time.monotonic() < until:
            print("still working", flush=True)
            time.sleep(0.1)
    if site.startswith("loudboth"):
        for n in range(int(os.environ.get("FAKE_LINES", "5000"))):
            print(f"out {n}")
            print(f"err {n}", file=sys.stderr)
        sys.stdout.flush()
    print(json.dumps({"site": site, "attempt": args.attempt}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
