"""A file per slot pool listing the leases it holds, so a crash can be cleaned up after.

Plain Python. Prefect counts a slot until its lease is released. A server with lease
expiry (the repossessor service of `prefect server start`) frees a dead holder's slots
once their leases expire; the temporary server of an ad hoc run has no such service, and
it dies with the run, so after a `kill -9` its slots would stay counted in the database
for ever and the next run at the same cap would wait for ever.

So each pool writes `<holder>-<pid>.jsonl` under `PREFECT_HOME/site-pipeline/leases`: a
header naming the process and the API, then `+` and `-` lines as it takes and gives back
leases. The file is removed when the pool closes. A file whose process is gone is an
orphan: `orphans()` finds them, and `flows.slots.prefect_api.reclaim` gives their slots back.
Only this host's files are seen: a run that died on another machine is that machine's.
"""

from __future__ import annotations

import json
import os
import threading
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
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def held(self, lease: UUID, names: Sequence[str]) -> None:
        """`lease` holds a slot of each of `names` (the global limit, and maybe a group's)."""
        with self._lock:
            self._write({"+": str(lease), "name": names[0], "names": list(names)})

    def given_back(self, lease: UUID) -> None:
        with self._lock:
            self._write({"-": str(lease)})

    def close(self) -> None:
        """Every lease went back: the file goes too."""
        with self._lock:
            self._file.close()
            self.path.unlink(missing_ok=True)


@dataclass
class Orphan:
    """What a dead pool's file says it still held."""

    path: Path
    holder: str
    api: str
    labels: dict[str, object] = field(default_factory=dict)  # the process (flows.ops.resume)
    leases: dict[UUID, tuple[str, ...]] = field(default_factory=dict)  # lease -> limit names


def read(path: Path) -> Orphan | None:
    """A ledger file's held leases; None for a file that is not one (or is empty)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        orphan = Orphan(path, str(header["holder"]), str(header["api"]), header.get("labels") or {})
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
        return orphan
    except (OSError, IndexError, KeyError, ValueError, TypeError):
        return None


def orphans(folder: Path, api: str) -> Iterator[Orphan]:
    """Ledgers for `api` whose process is gone. Never one of a live process, nor one whose
    process this host can't check."""
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.jsonl")):
        orphan = read(path)
        if orphan is None or orphan.api != api:
            continue
        if holder_alive(orphan.labels) is False:
            yield orphan
