"""Which waiting site gets the next parked slot: the slot pool's hand-out rule.

Plain Python, no threads, no locks, no clock: the caller (`flows.slots.pool.SlotPool`,
under its lock) passes the time in. The rules:

- Sites are served in list order. The frontier is the lowest list index that has neither
  started nor finished.
- With k slots parked, the first k sites from the frontier on may take them in any order
  (nobody behind them waits for nothing); with one slot, only the frontier site may.
- A site that has waited `patience` seconds is eligible anyway, so a site that never asks
  can't block the others.
- A started site (a retry) is always eligible: it needs no turn in line.
- Of the eligible waiting sites, the one earliest in the list gets the slot.
- A site of a group the caller says is full (`full`) is never eligible, and the line skips
  it: the frontier is the first site that is not in a full group, and the horizon does not
  count such sites, so a site waiting for its group never holds up the sites behind it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence


class HandOutRule:
    """The hand-out rule of one flow run over `sites` (list order, with `patience`);
    `groups` maps a site to its group (a site not in it belongs to none)."""

    def __init__(
        self, sites: Sequence[str], patience: float, groups: Mapping[str, str] | None = None
    ) -> None:
        self.patience = patience
        self._sites = list(sites)
        self._index = {site: i for i, site in enumerate(sites)}
        self._group = {self._index[s]: g for s, g in (groups or {}).items() if s in self._index}
        self._waiting: dict[int, float] = {}  # site index -> when it began to wait
        self._started: set[int] = set()
        self._finished: set[int] = set()
        self._frontier = 0  # lowest index that has neither started nor finished

    @property
    def frontier(self) -> int:
        """The lowest list index that has neither started nor finished."""
        return self._frontier

    @property
    def waiting(self) -> int:
        """How many sites wait for a slot."""
        return len(self._waiting)

    @property
    def waiting_sites(self) -> list[str]:
        """The sites that wait for a slot, in list order."""
        return [self._sites[index] for index in sorted(self._waiting)]

    @property
    def unfinished(self) -> int:
        """How many sites have not reached their final outcome."""
        return len(self._index) - len(self._finished)

    def add(self, site: str, group: str | None = None) -> None:
        """`site` (of `group`) joins the end of the list, unless it is in it already: a Dask
        worker's pool learns its sites as their task runs arrive."""
        if site in self._index:
            return
        index = self._index[site] = len(self._sites)
        self._sites.append(site)
        if group is not None:
            self._group[index] = group

    def wait(self, site: str, now: float) -> None:
        """`site` begins to wait for a slot at `now`. KeyError for a site not in the list."""
        self._waiting[self._index[site]] = now

    def stop_waiting(self, site: str) -> None:
        """`site` no longer waits (it got a slot, or gave up)."""
        del self._waiting[self._index[site]]

    def started(self, site: str) -> None:
        """`site` took a slot: its later attempts are retries."""
        self._started.add(self._index[site])
        self._advance()

    def finished(self, site: str) -> None:
        """`site` reached its final outcome: it will not ask again."""
        self._finished.add(self._index[site])
        self._advance()

    def next_in_line(
        self, parked: int, now: float, full: Collection[str] = frozenset()
    ) -> str | None:
        """The waiting site that gets the next of `parked` slots at `now`, or None; no site
        of a group in `full` gets it.

        (`parked` = 0 counts as 1: the caller asks only when a slot is parked.)"""
        line = self.in_line(parked, now, full)
        return line[0] if line else None

    def in_line(self, parked: int, now: float, full: Collection[str] = frozenset()) -> list[str]:
        """The eligible waiting sites at `now` with `parked` slots, earliest in the list
        first; none of a group in `full`."""
        horizon = self._horizon(parked, full)
        eligible = [
            index
            for index, since in self._waiting.items()
            if self._group.get(index) not in full
            and (index in self._started or index <= horizon or now - since >= self.patience)
        ]
        return [self._sites[index] for index in sorted(eligible)]

    def _horizon(self, parked: int, full: Collection[str]) -> int:
        """The last list index whose first attempt may take one of `parked` slots."""
        if not full:
            return self._frontier + max(0, parked - 1)
        blocked = {index for index, group in self._group.items() if group in full}
        index, end = self._frontier, len(self._sites)
        while index < end and (
            index in blocked or index in self._started or index in self._finished
        ):
            index += 1
        left = max(0, parked - 1)
        while left and index < end:
            index += 1
            if index not in blocked:
                left -= 1
        return index

    def _advance(self) -> None:
        while self._frontier in self._started or self._frontier in self._finished:
            self._frontier += 1
