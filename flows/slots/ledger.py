"""A file per slot pool listing the leases it holds, so a crash can be cleaned up after.

Plain Python. Prefect counts a slot until its lease is released. A server with lease
expiry (the repossessor service of `prefect server start`) frees a dead holder's slots
once their leases expire; but a server that keeps leases in memory (Prefect's default)
forgets them when it restarts and keeps counting their slots, and the embedded default's
server restarts often (a temporary server each run, the kept one after its idle stop). So
after a `kill -9` those slots would stay counted for ever and every later run at the same
cap would wait for ever.

So each pool writes `<holder>-<pid>.jsonl` under `PREFECT_HOME/site-pipeline/leases`: a
header naming the process, its flow run (the holder) and the server (`api`), then a line per change:

- `{"canary": id}`: a lease on no limit, a day long, renewed while the pool lives. While the
  server still knows it, the server has not lost its leases since the pool last renewed it
  (`flows.slots.reclaim`);
- beside it, `<holder>-<pid>.ask` holds the names of an acquire in flight (written before
  the pool asks, removed once the answer is in and noted): a slot the server may have counted
  for a live pool before its `+` line. A file, not lines: a pool waiting on a full limit asks
  many times a second, and its ledger must not grow with the wait;
- `{"+": lease, "names": [...]}` and `{"-": lease}` as it takes and gives back leases;
- `{"alive": t}` now and then, so its file's age says when its process was last seen.

The file is removed when the pool closes. A file whose process is gone is an orphan:
`orphans()` finds them. `holdings()` counts what live pools hold, per limit name.
A ledger names its process by host, pid and start time (`flows.process.holders`): a process
of another host can't be checked from here, so its ledger counts as live, never as an orphan.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from flows.process.holders import holder_alive, this_process_labels


class Ledger:
    """The leases one pool holds, mirrored to its file (append-only, one line per change)."""

    def __init__(self, folder: Path, holder: str, api: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{holder}-{os.getpid()}.jsonl"
        self._lock = threading.Lock()
        header = {"holder": holder, "api": api, "labels": this_process_labels()}
        self._file = self.path.open("a", encoding="utf-8")
        self._write(header)

    def _write(self, entry: Mapping[str, object]) -> None:
        # One write per line, flushed: a SIGKILL after it returns keeps it (the OS has it).
        with self._lock:
            if not self._file.closed:
                self._file.write(json.dumps(entry) + "\n")
                self._file.flush()

    def canary(self, lease: UUID) -> None:
        """The pool's canary lease (see the module docstring)."""
        self._write({"canary": str(lease)})

    @property
    def ask_path(self) -> Path:
        return ask_path(self.path)

    def asking(self, names: Sequence[str]) -> None:
        """The pool is about to ask for a slot of each of `names`."""
        self.ask_path.write_text(json.dumps(list(names)), encoding="utf-8")

    def answered(self) -> None:
        """The last ask got nothing (`held` ends a granted one)."""
        self.ask_path.unlink(missing_ok=True)

    def held(self, lease: UUID, names: Sequence[str]) -> None:
        """`lease` holds a slot of each of `names` (the global limit, and maybe a group's)."""
        self._write({"+": str(lease), "name": names[0], "names": list(names)})
        self.answered()

    def given_back(self, lease: UUID) -> None:
        self._write({"-": str(lease)})

    def alive(self) -> None:
        """Note that this process still runs (the file's age is when it was last seen)."""
        self._write({"alive": round(time.time())})

    def close(self) -> None:
        """Every lease went back: the file goes too."""
        with self._lock:
            self._file.close()
            self.path.unlink(missing_ok=True)
            self.ask_path.unlink(missing_ok=True)


def ask_path(path: Path) -> Path:
    """Where the ledger at `path` notes an acquire in flight."""
    return path.with_suffix(".ask")


@dataclass
class Orphan:
    """What a pool's file says it holds (for a dead pool: still held when it died)."""

    path: Path
    holder: str  # the flow run id
    api: str
    labels: dict[str, object] = field(default_factory=dict)  # the process (flows.ops.resume)
    leases: dict[UUID, tuple[str, ...]] = field(default_factory=dict)  # lease -> limit names
    canary: UUID | None = None
    asking: tuple[str, ...] = ()  # an ask not answered yet: names it may hold a slot of
    seen: float = 0.0  # when its process last wrote it (the file's mtime)

    def slots(self) -> Counter[str]:
        """Slots it holds (or may hold, an ask in flight) per limit name."""
        count: Counter[str] = Counter()
        for names in [*self.leases.values(), self.asking]:
            count.update(names)
        return count


Holding = Orphan
"""A live pool's ledger, as `holdings` reads it."""


def read(path: Path) -> Orphan | None:
    """A ledger file's held leases; None for a file that is not one (or is empty)."""
    try:
        seen = path.stat().st_mtime
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        orphan = Orphan(
            path,
            str(header["holder"]),
            str(header["api"]),
            header.get("labels") or {},
            seen=seen,
        )
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short by the crash
                continue
            if "+" in entry:
                names = entry.get("names") or [entry["name"]]  # "names": since group caps
                orphan.leases[UUID(entry["+"])] = tuple(str(name) for name in names)
            elif "-" in entry:
                orphan.leases.pop(UUID(entry["-"]), None)
            elif "canary" in entry:
                orphan.canary = UUID(entry["canary"])
        orphan.asking = _asking(path)
        return orphan
    except (OSError, IndexError, KeyError, ValueError, TypeError):
        return None


def _asking(path: Path) -> tuple[str, ...]:
    """The names of the acquire in flight of the ledger at `path`; () for none."""
    try:
        return tuple(str(name) for name in json.loads(ask_path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return ()


def ledgers(folder: Path, api: str) -> Iterator[tuple[Orphan, bool | None]]:
    """Every ledger for `api` in `folder`, and whether its process runs (None: it can't be
    checked from here, as for another host's)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.jsonl")):
        found = read(path)
        if found is not None and found.api == api:
            yield found, holder_alive(found.labels)


def orphans(folder: Path, api: str) -> Iterator[Orphan]:
    """Ledgers for `api` whose process is gone. Never one of a live process, nor one whose
    process this host can't check."""
    for found, alive in ledgers(folder, api):
        if alive is False:
            yield found


def holdings(folder: Path, api: str) -> Counter[str]:
    """The slots, per limit name, that pools for `api` whose process runs (or can't be
    checked) hold or may hold: what must never be given back."""
    count: Counter[str] = Counter()
    for found, alive in ledgers(folder, api):
        if alive is not False:
            count.update(found.slots())
    return count
