"""Run the site-pipeline flow COUNT times in this process, one after another, through the
Python API (`flows.run_pipeline`), each run to Completed; with PREFECT_FLOWS_HEARTBEAT_FREQUENCY
set, each flow run sends its heartbeats as any flow run does. Prints one line per run,
`<succeeded> <seconds>`, and exits 0 when every site of every run succeeded.

    python tests/support/fakes/completing_runs.py CONFIG COUNT
"""

import sys
import time

from flows import run_pipeline


def main() -> int:
    config, count = sys.argv[1], int(sys.argv[2])
    ok = True
    for _ in range(count):
        started = time.monotonic()
        results = run_pipeline(config_path=config)
        ok = ok and all(results.values())
        print(f"{all(results.values())} {time.monotonic() - started:.2f}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
