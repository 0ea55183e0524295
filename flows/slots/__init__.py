"""The cap: slots of a Prefect global concurrency limit, handed out to one flow run's sites.

- `pool`: `SlotPool`, the plain pool (threads, leases, fair share), on any `SlotApi`,
  tuned by a `PoolSettings`;
- `order`: `HandOutOrder`, which waiting site gets the next slot (pure, no threads);
- `ledger`: the file of leases a pool holds, for cleanup after a crash.
- `prefect_api`: the pool's Prefect side (the lease endpoints through Prefect's client),
  opening a pool on the current API, and reclaiming a dead pool's slots;
- `sharing`: one pool per flow run per process, shared by that process's task runs.

This package's surface (re-exported here) is plain Python; `prefect_api` and `sharing`
import Prefect and are imported by name.
"""

from flows.slots.order import HandOutOrder
from flows.slots.pool import (
    ApiUnavailable,
    LeaseLedger,
    PoolSettings,
    SlotApi,
    SlotError,
    SlotPool,
)

__all__ = [
    "ApiUnavailable",
    "HandOutOrder",
    "LeaseLedger",
    "PoolSettings",
    "SlotApi",
    "SlotError",
    "SlotPool",
]
