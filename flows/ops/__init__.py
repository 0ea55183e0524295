"""What the CLI asks of the Prefect server, besides running the flow.

- `admin`: reachability and the temporary server, setup, history, finding an earlier run,
  doctor;
- `notify`: notification blocks and automations (`setup`);
- `resume`: which sites `--retry-failed` runs again (plain Python).
"""
