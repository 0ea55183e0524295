"""Windows Job Objects: a pipeline's tree dies with us, and is counted and ended whole.

- `join_our_job` puts a pipeline in this process's Job Object, made with kill-on-close: when
  we die, however we die, its handle closes and every process in it is killed (the Windows
  counterpart of the reaper, `flows.process.groups`).
- `own_job` gives a pipeline a Job Object of its own, nested in ours, which holds every
  process of its tree, seen by a watch or not: `terminate_job` kills them all, and
  `close_job`, once the tree has ended, gives what the job counted (`job_account`: the CPU
  of every process that was ever in it, the largest commit of any one) as the attempt's
  cost (`flows.process.rusage.record`), as `wait4` gives it on POSIX.

The structures (winnt.h) and `job_account` are defined everywhere, so that turning them into
an account is tested on every platform. Elsewhere there is no Job Object: `own_job` gives
none, and `close_job` and `terminate_job` do nothing. Used by `flows.process.trees`.
"""

from __future__ import annotations

import ctypes
import sys
from ctypes import wintypes

from flows.process import rusage


# The Job Object's structures (winnt.h), defined everywhere so that turning them into an
# account is tested on every platform; only Windows fills them.
class _IoCounters(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in (
            "ReadOperationCount",
            "WriteOperationCount",
            "OtherOperationCount",
            "ReadTransferCount",
            "WriteTransferCount",
            "OtherTransferCount",
        )
    ]


class _BasicLimits(ctypes.Structure):
    _fields_ = [
        ("PerProcessUserTimeLimit", ctypes.c_int64),
        ("PerJobUserTimeLimit", ctypes.c_int64),
        ("LimitFlags", wintypes.DWORD),
        ("MinimumWorkingSetSize", ctypes.c_size_t),
        ("MaximumWorkingSetSize", ctypes.c_size_t),
        ("ActiveProcessLimit", wintypes.DWORD),
        ("Affinity", ctypes.c_size_t),
        ("PriorityClass", wintypes.DWORD),
        ("SchedulingClass", wintypes.DWORD),
    ]


class _ExtendedLimits(ctypes.Structure):
    _fields_ = [
        ("BasicLimitInformation", _BasicLimits),
        ("IoInfo", _IoCounters),
        ("ProcessMemoryLimit", ctypes.c_size_t),
        ("JobMemoryLimit", ctypes.c_size_t),
        ("PeakProcessMemoryUsed", ctypes.c_size_t),
        ("PeakJobMemoryUsed", ctypes.c_size_t),
    ]


class _BasicAccounting(ctypes.Structure):  # JOBOBJECT_BASIC_ACCOUNTING_INFORMATION
    _fields_ = [
        ("TotalUserTime", ctypes.c_int64),  # 100 ns units, ended processes included
        ("TotalKernelTime", ctypes.c_int64),
        ("ThisPeriodTotalUserTime", ctypes.c_int64),
        ("ThisPeriodTotalKernelTime", ctypes.c_int64),
        ("TotalPageFaultCount", wintypes.DWORD),
        ("TotalProcesses", wintypes.DWORD),
        ("ActiveProcesses", wintypes.DWORD),
        ("TotalTerminatedProcesses", wintypes.DWORD),
    ]


def job_account(basic: _BasicAccounting, extended: _ExtendedLimits) -> rusage.Account | None:
    """A Job Object's counts as an account: user + kernel CPU seconds of every process that
    was in it, and the largest commit of any one of them (it never held its spawner's
    memory, so the peak is the tree's own). A figure the job gives as 0 is not known, never
    0: a process that ran held memory and took CPU time (Wine's jobs count neither and give
    0). So a peak of 0 is not `peak_known`, and a CPU of 0 makes the whole account None (the
    attempt keeps the samples' figures, or null)."""
    cpu_s = (basic.TotalUserTime + basic.TotalKernelTime) / 10_000_000
    if cpu_s <= 0:
        return None
    # spawner_peak_mb 0: any peak above 0 is the tree's own; a peak of 0 is unknown
    return rusage.Account(peak_rss_mb=extended.PeakProcessMemoryUsed / rusage.MB, cpu_s=cpu_s)


if sys.platform == "win32":
    _JOB_OBJECT_BASIC_ACCOUNTING_INFORMATION = 1
    _JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
    _JOB_OBJECT_EXTENDED_LIMIT_INFORMATION = 9
    _PROCESS_SET_QUOTA = 0x0100
    _PROCESS_TERMINATE = 0x0001

    _job: int | None = None

    def _job_handle(kernel32: ctypes.WinDLL) -> int:
        """This process's Job Object: closed (so its processes killed) when we die."""
        global _job
        if _job is None:
            job = kernel32.CreateJobObjectW(None, None)
            if not job:
                raise ctypes.WinError(ctypes.get_last_error())
            limits = _ExtendedLimits()
            limits.BasicLimitInformation.LimitFlags = _JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
            if not kernel32.SetInformationJobObject(
                job,
                _JOB_OBJECT_EXTENDED_LIMIT_INFORMATION,
                ctypes.byref(limits),
                ctypes.sizeof(limits),
            ):
                raise ctypes.WinError(ctypes.get_last_error())
            _job = int(job)
        return _job

    def join_our_job(pid: int) -> None:
        """Kill `pid` when this process dies, however it dies (our Job Object)."""
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(_PROCESS_SET_QUOTA | _PROCESS_TERMINATE, False, pid)
        if not handle:
            raise ctypes.WinError(ctypes.get_last_error())
        try:
            if not kernel32.AssignProcessToJobObject(_job_handle(kernel32), handle):
                raise ctypes.WinError(ctypes.get_last_error())
        finally:
            kernel32.CloseHandle(handle)

    def own_job(pid: int) -> int | None:
        """A Job Object of `pid`'s own, nested in ours (`join_our_job` put it there first), to
        count its tree; None where it can't have one (its figures are then the samples')."""
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        job = kernel32.CreateJobObjectW(None, None)
        if not job:
            return None
        handle = kernel32.OpenProcess(_PROCESS_SET_QUOTA | _PROCESS_TERMINATE, False, pid)
        assigned = bool(handle) and bool(kernel32.AssignProcessToJobObject(job, handle))
        if handle:
            kernel32.CloseHandle(handle)
        if not assigned:
            kernel32.CloseHandle(job)
            return None
        return int(job)

    def close_job(job: int) -> rusage.Account | None:
        """What `job` counted (its tree has ended), then the job closed."""
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        basic, extended = _BasicAccounting(), _ExtendedLimits()
        try:
            got = kernel32.QueryInformationJobObject(
                job,
                _JOB_OBJECT_BASIC_ACCOUNTING_INFORMATION,
                ctypes.byref(basic),
                ctypes.sizeof(basic),
                None,
            ) and kernel32.QueryInformationJobObject(
                job,
                _JOB_OBJECT_EXTENDED_LIMIT_INFORMATION,
                ctypes.byref(extended),
                ctypes.sizeof(extended),
                None,
            )
        finally:
            kernel32.CloseHandle(job)
        return job_account(basic, extended) if got else None

    def terminate_job(job: int) -> None:
        """Kill every process in `job` (the pipeline's own): those no watch saw too."""
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.TerminateJobObject(job, 1)  # a failure leaves the kill of each known one

else:

    def own_job(pid: int) -> int | None:
        return None  # POSIX: `wait4` counts the tree (flows.process.rusage)

    def close_job(job: int) -> rusage.Account | None:
        return None

    def terminate_job(job: int) -> None:
        pass  # POSIX: no Job Object; the kill of each known process does it
