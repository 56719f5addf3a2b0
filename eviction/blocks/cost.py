"""Cost-aware eviction: keep the blocks that are expensive to recompute per byte they hold.

Recompute cost of the block at depth d (d = 0 is the first block of its chain), in units of
the block's dense work (QKV/O projections and MLP over its ``block_tokens`` tokens)::

    cost(d) = 1 + alpha * (d + 1)

Why: leaf-first eviction means a block is evicted only after its descendants, while its
ancestors stay cached, so re-creating it is one block of prefill whose queries attend over the
d + 1 blocks of its prefix (itself included). The dense part is the same for every block; the
attention part grows linearly with d. ``alpha`` is attention over one block of context divided
by the dense work of one block: about ``block_tokens / (6 * hidden_size)`` for a standard
transformer (FLOPs: 4*P*hidden per query per P keys vs ~24*hidden**2 per token), e.g. 0.01
for an 8B model and 0.07 for SmolLM2-135M with 256-token blocks. The default 0.05 sits between;
a caller that knows its model should pass its own.

Ordering (GreedyDual-Size): each key has ``H = L + cost(depth) / max(nbytes, 1)``, set on
insert and refreshed on every hit with the current inflation ``L``. Lowest ``H`` leaves first,
ties by least recent use. ``L`` starts at 0 and, on every ``on_remove``, rises to the lowest
``H`` tracked at that moment, which is the victim's own ``H`` when the store evicts
``candidates()[0]``; blocks (re)used later are therefore ranked above old blocks of the same
cost, so an expensive block that stops being used eventually leaves. Invariant:
``L <= H(k)`` for every tracked k, so a deletion, or an eviction that skipped pinned blocks,
never ages the tier past its lowest block.
"""

from __future__ import annotations

from itertools import islice

from .base import PolicyBase, check_insert, check_real, register_policy
from .heap import HeapItem, IndexedHeap


class _CostItem(HeapItem):
    __slots__ = ("key", "value")  # prio = (H, tick); value = cost(depth) / max(nbytes, 1)

    def __init__(self, key: bytes, value: float, prio: tuple[float, int]) -> None:
        super().__init__(prio)
        self.key = key
        self.value = value


@register_policy
class CostAwarePolicy(PolicyBase):
    """GreedyDual-Size over ``cost(d) = 1 + alpha*(d+1)``; lowest ``H`` first, ties least recent.

    Options: ``alpha`` (float >= 0, default 0.05): attention cost of one block of context
    relative to a block's dense work (see the module docstring). With ``alpha = 0`` every
    block costs the same and the policy prefers to evict large blocks.

    ``candidates(n)``: O(n log n) (best-first walk of an indexed heap); updates O(log N).
    """

    __slots__ = ("alpha", "_heap", "_item_of", "_inflation", "_tick")
    name = "cost"

    def __init__(self, *, alpha: float = 0.05) -> None:
        self.alpha = check_real("alpha", alpha, low=0.0)
        self._heap: IndexedHeap[_CostItem] = IndexedHeap()
        self._item_of: dict[bytes, _CostItem] = {}
        self._inflation = 0.0
        self._tick = 0

    @property
    def inflation(self) -> float:
        """The GreedyDual inflation value ``L``."""
        return self._inflation

    def recompute_cost(self, depth: int) -> float:
        """``1 + alpha * (depth + 1)``: prefill cost of the block at ``depth``, in block units."""
        return 1.0 + self.alpha * (depth + 1)

    def get_priority(self, key: bytes) -> tuple[float, int] | None:
        """``(H, tick of last use)``: lower leaves first. None for an unknown key."""
        item = self._item_of.get(key) if isinstance(key, bytes) else None
        return None if item is None else item.prio

    def on_insert(self, key: bytes, nbytes: int, *, depth: int = 0, tenant: str = "") -> None:
        check_insert(key, nbytes, depth, tenant)
        if key in self._item_of:
            self.on_access(key)  # the block behind a key never changes: keep its cost
            return
        self._tick += 1
        value = self.recompute_cost(depth) / max(nbytes, 1)
        item = _CostItem(key, value, (self._inflation + value, self._tick))
        self._item_of[key] = item
        self._heap.push(item)

    def on_access(self, key: bytes) -> None:
        item = self._item_of.get(key) if isinstance(key, bytes) else None
        if item is not None:
            self._tick += 1
            self._heap.update(item, (self._inflation + item.value, self._tick))

    def on_remove(self, key: bytes) -> None:
        item = self._item_of.pop(key, None) if isinstance(key, bytes) else None
        if item is None:
            return
        lowest = self._heap.peek()
        assert lowest is not None  # it holds item
        self._inflation = lowest.prio[0]  # the lowest H, before the removal
        self._heap.remove(item)

    def _candidates(self, n: int) -> list[bytes]:  # O(n log n)
        return [item.key for item in islice(self._heap.ordered(), n)]

    def __len__(self) -> int:
        return len(self._item_of)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and key in self._item_of
