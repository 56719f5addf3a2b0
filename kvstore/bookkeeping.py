"""The TieredStore's bookkeeping, one small object per concern.

None of these touches a tier or blocks on I/O: each call is a few dictionary or heap operations.
They are not thread-safe on their own; the store calls them under its lock (``EventLog`` excepted,
which has its own so that readers of the stream never wait on the store). The store itself is
left with orchestration: plan under the lock, run tier I/O outside it, commit under it.

- ``EventLog``: stored / removed events with monotonic ids, bounded (the oldest are dropped);
- ``LeaseTable``: pins with a TTL; the store pins and unpins the index slots they name;
- ``TenantLedger``: logical bytes per tenant (each block counted once, whatever its tiers), the
  bytes reserved by puts in flight, and the quotas both are held to;
- ``WriteThroughQueue``: per write-through tier, the keys the tier refused, oldest first, bounded.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class Event:
    id: int
    kind: str  # "stored" | "removed"
    key: bytes
    tier: str
    model: str  # the spec's short_fingerprint (8 hex digits)
    time: float

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "key": self.key.hex(), "tier": self.tier, "model": self.model, "time": self.time}


class EventLog:
    """The last ``max_events`` events; ids start at 1 and never repeat."""

    def __init__(self, max_events: int) -> None:
        self._events: deque[Event] = deque(maxlen=max_events)
        self._ids = itertools.count(1)
        self._last_id = 0
        self._lock = threading.Lock()

    def emit(self, kind: str, key: bytes, tier: str, model: str) -> None:
        with self._lock:
            eid = next(self._ids)
            self._last_id = eid
            self._events.append(Event(eid, kind, key, tier, model, time.time()))

    def since(self, after: int, limit: int) -> list[Event]:
        with self._lock:
            out = []
            for ev in self._events:
                if ev.id > after:
                    out.append(ev)
                    if len(out) >= limit:
                        break
            return out

    @property
    def last_id(self) -> int:
        return self._last_id


@dataclass(frozen=True)
class Lease:
    id: int
    expires_at: float
    num_pinned: int


class LeaseTable:
    """Leases by id and by expiry (a heap; an ended lease's heap entry is skipped when it surfaces)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._slots: dict[int, list[int]] = {}
        self._heap: list[tuple[float, int]] = []
        self._ids = itertools.count(1)

    def add(self, slots: list[int], ttl_s: float) -> Lease:
        lease_id = next(self._ids)
        expires = self._clock() + ttl_s
        self._slots[lease_id] = slots
        heapq.heappush(self._heap, (expires, lease_id))
        return Lease(lease_id, expires, len(slots))

    def end(self, lease_id: int) -> list[int] | None:
        """The slots a live lease pinned (the caller unpins them); None if unknown or expired."""
        return self._slots.pop(lease_id, None)

    def expired(self) -> Iterator[list[int]]:
        """The slots of each lease past its expiry, removing it (the caller unpins them)."""
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            _, lease_id = heapq.heappop(self._heap)
            slots = self._slots.pop(lease_id, None)
            if slots is not None:
                yield slots

    def __len__(self) -> int:
        return len(self._slots)


class TenantLedger:
    """Logical bytes per tenant and the quotas they are held to.

    ``held`` counts blocks resident somewhere (a block counts once however many tiers hold it);
    ``reserved`` counts blocks a put has admitted but not yet written, so that two puts of one
    tenant running at once cannot both squeeze under its quota.
    """

    def __init__(self, quotas: dict[str, int] | None) -> None:
        self.quotas = dict(quotas or {})
        for tenant, q in self.quotas.items():
            if isinstance(q, bool) or not isinstance(q, int) or q < 0:
                raise ValueError(f"quota of tenant {tenant!r} must be a non-negative int of bytes, got {q!r}")
        self._held: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self.evictions = 0  # blocks removed to make room under a quota
        self.refusals = 0  # blocks refused because the quota could not make room

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    def charge(self, tenant: str, nbytes: int) -> None:
        self._held[tenant] = self._held.get(tenant, 0) + nbytes

    def credit(self, tenant: str, nbytes: int) -> None:
        self._held[tenant] = self._held.get(tenant, 0) - nbytes

    def reserve(self, tenant: str, nbytes: int) -> None:
        self._reserved[tenant] = self._reserved.get(tenant, 0) + nbytes

    def release(self, tenant: str, nbytes: int) -> None:
        left = self._reserved.get(tenant, 0) - nbytes
        if left:
            self._reserved[tenant] = left
        else:
            self._reserved.pop(tenant, None)

    def over_quota(self, tenant: str, nbytes: int) -> int:
        """Bytes ``tenant`` must free before ``nbytes`` more fit its quota (0: they fit; -1: they never can)."""
        quota = self.quotas.get(tenant)
        if quota is None:
            return 0
        if nbytes > quota:
            return -1
        return max(0, self._held.get(tenant, 0) + self._reserved.get(tenant, 0) + nbytes - quota)

    def nonzero(self) -> dict[str, int]:
        return {k: v for k, v in self._held.items() if v}


class WriteThroughQueue:
    """Keys one write-through tier refused (its faster tiers hold them), oldest first, at most ``capacity``.

    A retry ``claim``s the oldest key (it leaves the queue, so two retriers never copy the same
    block) and ``requeue``s it at the front if the tier refuses it again.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self.retried = 0  # blocks written on a later try
        self.dropped = 0  # keys forgotten because the queue was full

    def remember(self, key: bytes) -> None:
        if not self.capacity:
            return
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
            self.dropped += 1

    def claim(self) -> bytes | None:
        if not self._keys:
            return None
        return self._keys.popitem(last=False)[0]

    def requeue(self, key: bytes) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key, last=False)
        if len(self._keys) > self.capacity:  # filled meanwhile: the requeued key is the oldest
            self._keys.popitem(last=False)
            self.dropped += 1

    def __len__(self) -> int:
        return len(self._keys)
