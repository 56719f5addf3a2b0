"""Small helpers for kvtier's background threads: lower a thread's CPU priority (nice) and its I/O
priority (Linux ``ioprio_set``), so that work in the background (puts' demotions to the disk tier,
write-throughs, the host tier's reserve) yields to gets and lookups on a busy machine.

I/O priorities (``io_priority``):

- ``"normal"``: unchanged (the process's, normally best-effort level 4);
- ``"low"``: best-effort class, level 7 (the lowest best-effort level). Schedulers that order requests
  by level (BFQ) serve this thread's reads and writes after other best-effort I/O; mq-deadline and
  ``none`` treat every best-effort level alike, so there it changes nothing; it never starves;
- ``"idle"``: the idle class: its I/O waits while any other I/O is pending (mq-deadline ages it after
  ``prio_aging_expire``, 10 s by default). Use only where a put may wait that long behind other I/O.

Both are per thread (a Linux thread is a task of its own) and cannot be raised again without
privilege, so they are set once in threads that only do background work (executor initializers).
Where the system refuses, the thread keeps its priority and a debug log says so.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading

log = logging.getLogger("kvtier")

IO_PRIORITIES = ("normal", "low", "idle")
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_CLASS_BE, _IOPRIO_CLASS_IDLE = 2, 3
_IOPRIO_WHO_PROCESS = 1
# syscall numbers of ioprio_set / ioprio_get (no libc wrapper)
_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31)}
_libc = None


def _syscall(n: int, *args: int) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    r = _libc.syscall(n, *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def check_io_priority(io_priority: str) -> str:
    if io_priority not in IO_PRIORITIES:
        raise ValueError(f"io_priority must be one of {', '.join(IO_PRIORITIES)}, got {io_priority!r}")
    return io_priority


def set_thread_io_priority(io_priority: str) -> bool:
    """Set the calling thread's I/O priority (see the module docstring); True when it was set.
    ``"normal"`` leaves it; ValueError for an unknown name."""
    check_io_priority(io_priority)
    if io_priority == "normal":
        return False
    nums = _SYSCALLS.get(platform.machine())
    if nums is None or not hasattr(threading, "get_native_id"):
        log.debug("no ioprio_set on %s: I/O priority unchanged", platform.machine())
        return False
    value = (_IOPRIO_CLASS_BE << _IOPRIO_CLASS_SHIFT) | 7 if io_priority == "low" else _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
    try:
        _syscall(nums[0], _IOPRIO_WHO_PROCESS, threading.get_native_id(), value)
    except OSError as e:
        log.debug("I/O priority %s not set: %s", io_priority, e)
        return False
    return True


def thread_io_priority(tid: int | None = None) -> tuple[int, int] | None:
    """(class, level) of thread ``tid`` (the calling thread by default): class 0 none (the
    process's default, best-effort by nice), 1 real-time, 2 best-effort, 3 idle. None where it cannot be asked."""
    nums = _SYSCALLS.get(platform.machine())
    if nums is None:
        return None
    try:
        v = _syscall(nums[1], _IOPRIO_WHO_PROCESS, threading.get_native_id() if tid is None else tid)
    except OSError:
        return None
    return v >> _IOPRIO_CLASS_SHIFT, v & ((1 << _IOPRIO_CLASS_SHIFT) - 1)


def lower_thread_priority(nice: int, what: str, io_priority: str = "normal") -> None:
    """Raise the calling thread's nice value by ``nice`` (capped at 19; Linux: a thread is a task of its
    own) and set its I/O priority to ``io_priority`` (``"normal"``: unchanged). Where that is not
    permitted the thread keeps its priority, and ``what`` names it in a debug log."""
    if io_priority != "normal":
        set_thread_io_priority(io_priority)
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as e:  # not permitted here: the thread runs at the usual priority
        log.debug("%s keep their priority: %s", what, e)
