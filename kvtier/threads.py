"""Small helpers for kvtier's background threads."""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("kvtier")


def lower_thread_priority(nice: int, what: str) -> None:
    """Raise the calling thread's nice value by ``nice`` (capped at 19; Linux: a thread is a task of its
    own). Where that is not permitted the thread keeps its priority, and ``what`` names it in a debug log."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as e:  # not permitted here: the thread runs at the usual priority
        log.debug("%s keep their priority: %s", what, e)
