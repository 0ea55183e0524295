"""The operating system's own account of a finished pipeline: its CPU seconds and peak RSS.

Sampling the tree (`flows.process.trees.watch`, every POLL_SECONDS) misses what lives between
two samples: a short child that burns CPU, or a whole pipeline shorter than a sample. The
kernel keeps exact figures. On POSIX the pipeline is reaped here with `os.wait4`, whose
resource usage is the pipeline's and that of every descendant it (or they) waited for, as
GNU time reports it: user + system CPU seconds of them all, and `ru_maxrss`, the largest RSS
of any one of them. `Popen.returncode` is set from the same wait, so the `Popen` object never
reaps it a second time.

The peak has a catch, on Linux: at `exec` the kernel counts the peak RSS of the memory the
process had before it (the spawning process's, the flow's: 100-250 MB with Prefect loaded)
into the new program's `ru_maxrss`. So a figure up to the spawner's own peak says nothing
about the pipeline; one above it can only be the pipeline's tree. `Account.peak_known` tells
the two apart (`spawner_peak_mb` is this process's own `ru_maxrss` when it reaped it).

Windows has no `wait4`: there `reap` and `poll` leave the process to `Popen`, and the tree
backend (`flows.process.trees`) `record`s what the pipeline's own Job Object
(`flows.process.job_object`) counted once its tree has ended: the CPU of every process that
was in it, and the largest commit (private memory) of any one of them. Without that,
`account` is None and the attempt keeps the sampled figures (flows.process.attempt.cost).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass

MB = 1024 * 1024

# ru_maxrss is in kilobytes on Linux and the BSDs, in bytes on macOS (getrusage(2)).
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


@dataclass(frozen=True)
class Account:
    """What the kernel counted for a reaped pipeline and its reaped descendants."""

    peak_rss_mb: float  # the largest RSS of any one of them (ru_maxrss)
    cpu_s: float  # user + system seconds of them all
    spawner_peak_mb: float = 0.0  # this process's own ru_maxrss when it reaped the pipeline

    @property
    def peak_known(self) -> bool:
        """The peak is the pipeline tree's own: above what `exec` may have carried over from
        the spawning process (see the module's docstring)."""
        return self.peak_rss_mb > self.spawner_peak_mb


_accounts: weakref.WeakKeyDictionary[subprocess.Popen[bytes], Account] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def supported() -> bool:
    """True where `os.wait4` exists (POSIX)."""
    return hasattr(os, "wait4")


def poll(proc: subprocess.Popen[bytes]) -> int | None:
    """`proc.poll()`, reaping with `wait4` where it exists (its account kept for `account`)."""
    return _wait(proc, block=False)


def reap(proc: subprocess.Popen[bytes]) -> int:
    """`proc.wait()`, reaping with `wait4` where it exists (its account kept)."""
    code = _wait(proc, block=True)
    assert code is not None  # noqa: S101  (a blocking wait returns a status)
    return code


def record(proc: subprocess.Popen[bytes], counted: Account) -> None:
    """Keep `counted` as `proc`'s account: what the operating system counted for its tree
    where `wait4` can't (the Job Object on Windows)."""
    with _lock:
        _accounts[proc] = counted


def account(proc: subprocess.Popen[bytes]) -> Account | None:
    """The kernel's account of `proc`, once `poll` or `reap` reaped it; None before, where
    the platform keeps none, or when something else reaped it."""
    with _lock:
        return _accounts.get(proc)


def _wait(proc: subprocess.Popen[bytes], block: bool) -> int | None:
    if proc.returncode is not None:
        return proc.returncode
    if sys.platform == "win32" or not supported():  # (the test is for mypy --platform win32)
        return proc.wait() if block else proc.poll()
    import resource  # POSIX only

    try:  # one thread waits for a given pipeline: its attempt's
        pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # reaped by someone else: no account
        return proc.wait() if block else proc.poll()
    if pid == 0:
        return None
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with _lock:
        _accounts[proc] = Account(
            peak_rss_mb=usage.ru_maxrss * _MAXRSS_UNIT / MB,
            cpu_s=usage.ru_utime + usage.ru_stime,
            spawner_peak_mb=own * _MAXRSS_UNIT / MB,
        )
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode
