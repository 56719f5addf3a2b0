"""LRU and FIFO: the order of one OrderedDict.

Structure: ``OrderedDict key -> tick`` kept in eviction order, oldest first. Why not a heap:
a hit is ``move_to_end`` (O(1)) and the best ``n`` victims are simply the first ``n`` entries,
so ``candidates(n)`` is O(n) however many keys are tracked. The tick is kept only to answer
``get_priority`` (the order the dict already encodes).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import islice

from .base import PolicyBase, check_insert, register_policy


class _OrderedPolicy(PolicyBase):
    """Eviction order = order of the last *refresh*; subclasses say whether a hit refreshes."""

    __slots__ = ("_order", "_tick")
    _refresh_on_access: bool

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, int] = OrderedDict()
        self._tick = 0

    def get_priority(self, key: bytes) -> tuple[int] | None:
        """``(tick of the last refresh,)``: lower leaves first. None for an unknown key."""
        tick = self._order.get(key) if isinstance(key, bytes) else None
        return None if tick is None else (tick,)

    def on_insert(self, key: bytes, nbytes: int, *, depth: int = 0, tenant: str = "") -> None:
        check_insert(key, nbytes, depth, tenant)
        if key in self._order:
            self.on_access(key)
            return
        self._tick += 1
        self._order[key] = self._tick

    def on_access(self, key: bytes) -> None:
        if self._refresh_on_access and isinstance(key, bytes) and key in self._order:
            self._tick += 1
            self._order[key] = self._tick
            self._order.move_to_end(key)

    def on_remove(self, key: bytes) -> None:
        if isinstance(key, bytes):
            self._order.pop(key, None)

    def _candidates(self, n: int) -> list[bytes]:  # O(n)
        return list(islice(self._order, n))

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and key in self._order


@register_policy
class LRUPolicy(_OrderedPolicy):
    """Least recently used first (an insert or a hit refreshes). No options."""

    __slots__ = ()
    name = "lru"
    _refresh_on_access = True


@register_policy
class FIFOPolicy(_OrderedPolicy):
    """First inserted first; hits change nothing. No options. A baseline for the others."""

    __slots__ = ()
    name = "fifo"
    _refresh_on_access = False
