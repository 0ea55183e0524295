"""The cap: slots of a Prefect global concurrency limit, handed out to one flow run's sites.

The plain pool, its layers one job a module (as Prefect's `concurrency/` names its own):

- `pool`: `SlotPool`, the pool's public face (its threads, fair share, park or not), on any
  `SlotApi`, tuned by a `PoolSettings`;
- `slot_api`: `SlotApi`, what the pool needs from the server, and its errors;
- `pool_state`: what the pool's threads share under one lock, and `PoolSettings`;
- `hand_out`: a site's thread takes a slot and gives it back (`WaitStopped`);
- `broker`: the one thread that asks the server for slots, and warns while it fails;
- `lease_book`: the leases a pool holds, renewed and given back;
- `upkeep`: the upkeep thread (linger, renewals, long-wait notices) and the releaser threads;
- `order`: `HandOutRule`, which waiting site gets the next slot (pure, no threads);
- `ledger`: the file of leases a pool holds, for cleanup after a crash.

Its Prefect side, imported by name:

- `prefect_api`: the lease endpoints through Prefect's client, limit setup, API errors;
- `prefect_pool`: opening a pool on the current API;
- `ledger_home`: where this host's ledgers are and which server they name;
- `reclaim`: giving back a dead pool's slots; `slot_holders`: who holds a limit's slots;
- `sharing`: one pool per flow run per process, shared by that process's task runs.

This package's surface (re-exported here) is plain Python.
"""

from flows.slots.hand_out import WaitStopped
from flows.slots.hand_out_rule import HandOutRule
from flows.slots.lease_book import LeaseLedger
from flows.slots.pool import SlotPool
from flows.slots.pool_state import PoolSettings
from flows.slots.slot_api import LEASE_SECONDS, ApiUnavailable, SlotApi, SlotError

__all__ = [
    "LEASE_SECONDS",
    "ApiUnavailable",
    "HandOutRule",
    "LeaseLedger",
    "PoolSettings",
    "SlotApi",
    "SlotError",
    "SlotPool",
    "WaitStopped",
]
