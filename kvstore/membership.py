"""What a shared tier holds, as far as this process knows, and how a lookup asks without waiting on it.

A shared tier (Redis) is written and emptied by other processes too, so the store's index cannot
say what it holds. Asking it on every lookup made a lookup as slow as the tier: with Redis answering
200 ms late, every lookup took 200 ms. Two pieces bound that wait:

- ``MembershipView``: per key of the shared tier, what this process last saw of it (present until
  an expiry, or absent), learnt from its own writes, reads, deletes and checks, and from other
  instances' announcements (``RedisTier.listen_invalidations``). Bounded (least recently updated
  keys are forgotten first); thread-safe on its own lock. A check that was sent before a newer
  fact arrived does not overwrite it (``since``).
- ``MembershipRefresher``: asks the tier on a thread of its own (``contains``: one pipelined
  round trip per spec), coalescing every request queued meanwhile into the next round, so a slow
  tier sees one request at a time however many lookups arrive. A lookup queues its keys and waits
  for the answer at most ``TieredStore.shared_lookup_wait_s``; past that it answers from the view,
  and the answer, when it comes, updates the view for the next lookups.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Sequence

from .spec import KVSpec

log = logging.getLogger(__name__)

__all__ = ["MembershipRefresher", "MembershipView"]

_ABSENT = 0.0


class MembershipView:
    """Per key, whether it was last seen present (until when) or absent, with the order of the facts."""

    def __init__(self, max_keys: int = 1 << 18) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be a positive int, got {max_keys!r}")
        self.max_keys = max_keys
        self._seen: OrderedDict[bytes, tuple[float, int]] = OrderedDict()  # key -> (present until, or 0.0: absent; seq)
        self._seq = itertools.count(1)
        self._last = 0
        self._lock = threading.Lock()

    def mark(self) -> int:
        """A point in the order of facts: pass it as ``since`` to ``note`` a fact learnt from a request sent now."""
        with self._lock:
            return self._last

    def note(self, keys: Sequence[bytes], present: bool | Sequence[bool], *, until: float = math.inf, since: int | None = None) -> None:
        """Record ``keys`` as present (until ``until``, ``time.monotonic()``) or absent. ``since``: the
        facts come from a request sent at ``mark()``; a key updated after it keeps its newer fact."""
        flags = [present] * len(keys) if isinstance(present, bool) else present
        with self._lock:
            seen = self._seen
            for key, p in zip(keys, flags):
                if since is not None:
                    old = seen.get(key)
                    if old is not None and old[1] > since:
                        continue
                seq = self._last = next(self._seq)
                seen[key] = (until if p else _ABSENT, seq)
                seen.move_to_end(key)
            while len(seen) > self.max_keys:
                seen.popitem(last=False)

    def known(self, keys: Sequence[bytes]) -> list[bool | None]:
        """Per key: True (seen present, not expired), False (seen absent or expired), None (never seen)."""
        now = time.monotonic()
        with self._lock:
            get = self._seen.get
            out: list[bool | None] = []
            for key in keys:
                v = get(key)
                out.append(None if v is None else v[0] > now)
            return out

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def __len__(self) -> int:
        return len(self._seen)


class MembershipRefresher:
    """Asks ``tier.contains`` on a thread of its own, one coalesced round at a time.

    ``ask(spec, keys)`` returns a future of the per-key answers (``None`` when the round failed or
    the refresher is closed), or ``None`` when more than ``max_pending_keys`` keys are queued
    already (the tier is not keeping up: the caller answers from what it knows)."""

    def __init__(self, tier: Any, max_pending_keys: int = 1 << 16) -> None:
        self.tier = tier
        self.max_pending_keys = max_pending_keys
        self._cv = threading.Condition()
        self._pending: list[tuple[KVSpec, list[bytes], Future]] = []
        self._pending_keys = 0
        self._busy_since: float | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.rounds = 0

    def ask(self, spec: KVSpec, keys: Sequence[bytes]) -> Future | None:
        with self._cv:
            if self._closed or self._pending_keys + len(keys) > self.max_pending_keys:
                return None
            fut: Future = Future()
            self._pending.append((spec, list(keys), fut))
            self._pending_keys += len(keys)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"kvtier-{self.tier.name}-membership", daemon=True)
                self._thread.start()
            self._cv.notify()
        return fut

    def stalled_for(self) -> float:
        """Seconds the round in flight has taken so far (0: none in flight)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                batch, self._pending, self._pending_keys = self._pending, [], 0
                if self._closed:
                    for _, _, fut in batch:
                        fut.set_result(None)
                    return
                self._busy_since = time.monotonic()
            try:
                by_spec: dict[KVSpec, dict[bytes, bool]] = {}
                for spec, keys, _ in batch:
                    by_spec.setdefault(spec, {}).update(dict.fromkeys(keys, False))
                for spec, answers in by_spec.items():
                    ks = list(answers)
                    answers.update(zip(ks, self.tier.contains(ks, spec=spec)))
                for spec, keys, fut in batch:
                    answers = by_spec[spec]
                    fut.set_result([answers[k] for k in keys])
            except Exception:  # a bug in the tier: logged, the lookups answer from the view
                log.exception("membership check of tier %s failed", self.tier.name)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
            finally:
                self._busy_since = None
                self.rounds += 1

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)
