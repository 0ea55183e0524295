"""What a slot pool needs from a concurrency-limit API, and how that API fails.

Plain Python: `SlotApi` is the protocol (`flows.slots.prefect_api.PrefectSlotApi` is the
Prefect one; the tests use an in-memory fake), with the errors its calls raise and the
server's lease terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol
from uuid import UUID

LEASE_SECONDS = 60.0  # the server's minimum; renewed every third of it
PROBE_LEASE = UUID(int=0)
"""A lease nobody holds: renewing it asks the server's lease storage, which answers 410."""


class SlotError(RuntimeError):
    """The concurrency limit can't be used: it does not exist, or the API kept failing."""


class ApiUnavailable(Exception):
    """One API call failed in a way that may pass: 5xx, 401, 403, or no connection."""

    def __init__(self, status: str) -> None:
        self.status = status
        super().__init__(status)


class SlotApi(Protocol):
    """What the pool needs from a concurrency-limit API. Each method is one try."""

    @property
    def url(self) -> str:
        """Where the API is, for messages."""
        ...

    def acquire(self, names: Sequence[str], lease_seconds: float) -> UUID | None:
        """One lease on a slot of each of `names`, all or none: None while any is full.

        Raises `ApiUnavailable`, or `SlotError` when a limit does not exist."""
        ...

    def renew(self, lease: UUID, lease_seconds: float) -> bool:
        """Extend a lease; False when the server does not know it. Raises `ApiUnavailable`."""
        ...

    def release(self, lease: UUID) -> None:
        """Give a lease's slots back. Raises `ApiUnavailable`."""
        ...

    def release_unleased(self, names: Sequence[str], held_seconds: float) -> None:
        """Give back one slot of each of `names` without a lease. Raises `ApiUnavailable`,
        or `SlotError` when the server refuses for good."""
        ...
