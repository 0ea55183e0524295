"""Process control behind one small interface, with two backends.

- `group` (POSIX, `flows.process.groups`): the pipeline leads its own process group; stop =
  SIGTERM to the group, then SIGKILL; a reaper process covers a SIGKILL of our own process.
- `tree` (Windows, and anywhere, `flows.process.trees`): the pipeline's descendants are tracked
  while it runs; stop = a polite end of the whole tree (Ctrl-Break on Windows, SIGTERM
  elsewhere), then a kill; a Job Object (Windows) or the reaper covers our own death.

`pipeline.process_control: auto | group | tree` picks one; `auto` is `group` where POSIX
process groups exist, else `tree`. The same behaviour tests run on both backends on Linux.
Both watch and sample the tree the same way (`flows.process.trees.watch`: its RSS and CPU
seconds, for the attempt's usage and `memory_limit`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from flows.process import groups as procgroup
from flows.process import rusage
from flows.process import trees as proctree
from flows.process.trees import TreeUsage

ControlKind = Literal["auto", "group", "tree"]


class ProcessControl(Protocol):
    """Start one pipeline, watch it, stop everything it started."""

    name: str

    def spawn(
        self,
        argv: Sequence[str],
        cwd: str | os.PathLike[str],
        env: Mapping[str, str],
        owner: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` (never through a shell) on behalf of `owner` (a flow run).
        stdin is the null device; stdout and stderr are pipes. Raises OSError."""
        ...

    def watch(self, proc: subprocess.Popen[bytes]) -> TreeUsage | None:
        """Called while the pipeline runs (every fraction of a second): the tree's usage at
        this sample (RSS, its peak, CPU seconds), or None when nothing could be sampled."""
        ...

    def usage(self, proc: subprocess.Popen[bytes]) -> TreeUsage | None:
        """The tree's usage now, from the processes already seen by `watch` (no search for
        new ones): the attempt's last sample, taken before `stop`."""
        ...

    def exited(self, proc: subprocess.Popen[bytes]) -> bool:
        """True once the pipeline itself has exited."""
        ...

    def stop(self, proc: subprocess.Popen[bytes], grace: float) -> None:
        """Stop the pipeline and all it started: politely, then by force after `grace` s.
        Also called after a normal exit, for what it left running."""
        ...

    def stop_all(self, grace: float, owner: str | None = None) -> list[int]:
        """Stop every pipeline this process started for `owner` (None: all)."""
        ...


class GroupControl:
    """POSIX process groups (`flows.process.groups`), and the tree tracked besides.

    The group holds every descendant that does not leave it; one that does (`setsid`, a
    daemon) is still seen by the tree's watch (`flows.process.trees`) while the attempt runs,
    and stopped after the group.
    """

    name = "group"

    def spawn(
        self,
        argv: Sequence[str],
        cwd: str | os.PathLike[str],
        env: Mapping[str, str],
        owner: str | None = None,
    ) -> subprocess.Popen[bytes]:
        proc = procgroup.spawn(argv, cwd, env, owner)
        proctree.track(proc, owner)
        return proc

    def watch(self, proc: subprocess.Popen[bytes]) -> TreeUsage | None:
        return proctree.watch(proc)

    def usage(self, proc: subprocess.Popen[bytes]) -> TreeUsage | None:
        return proctree.usage(proc)

    def exited(self, proc: subprocess.Popen[bytes]) -> bool:
        return procgroup.exited(proc)

    def stop(self, proc: subprocess.Popen[bytes], grace: float) -> None:
        procgroup.stop_group(proc, grace)
        proctree.stop_tree(proc, grace)  # what left the group

    def stop_all(self, grace: float, owner: str | None = None) -> list[int]:
        stopped = procgroup.stop_all(grace, owner)
        proctree.stop_all(grace, owner)
        return stopped


class TreeControl:
    """Tracked process trees (`flows.process.trees`)."""

    name = "tree"

    def spawn(
        self,
        argv: Sequence[str],
        cwd: str | os.PathLike[str],
        env: Mapping[str, str],
        owner: str | None = None,
    ) -> subprocess.Popen[bytes]:
        return proctree.spawn(argv, cwd, env, owner)

    def watch(self, proc: subprocess.Popen[bytes]) -> TreeUsage | None:
        return proctree.watch(proc)

    def usage(self, proc: subprocess.Popen[bytes]) -> TreeUsage | None:
        return proctree.usage(proc)

    def exited(self, proc: subprocess.Popen[bytes]) -> bool:
        return rusage.poll(proc) is not None  # reaped with the kernel's account of it

    def stop(self, proc: subprocess.Popen[bytes], grace: float) -> None:
        proctree.stop_tree(proc, grace)

    def stop_all(self, grace: float, owner: str | None = None) -> list[int]:
        return proctree.stop_all(grace, owner)


class UnsupportedControl(RuntimeError):
    """The backend asked for does not exist on this platform."""


def control_for(kind: ControlKind) -> ProcessControl:
    """The backend for `kind`; raises `UnsupportedControl` for `group` without POSIX groups."""
    if kind == "auto":
        kind = "group" if procgroup.supported() else "tree"
    if kind == "group":
        if not procgroup.supported():
            raise UnsupportedControl(
                "process_control = 'group': this platform has no POSIX process groups; "
                "expected auto or tree"
            )
        return GroupControl()
    return TreeControl()


def stop_everything(kind: ControlKind, grace: float, owner: str | None = None) -> list[int]:
    """The emergency stop: every pipeline this process started for `owner` (None: all),
    now (politely, then by force after `grace` s), with `kind`'s backend."""
    return control_for(kind).stop_all(grace, owner=owner)
