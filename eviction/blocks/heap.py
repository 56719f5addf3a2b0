"""An indexed binary min-heap: items know their position, so any item can be re-prioritised or
removed in O(log N) and the heap never holds stale entries.

Why not ``heapq`` with lazy deletion: a hit re-prioritises a key, and lazy deletion leaves the
old entry behind, *ahead* of the new one (priorities only grow). ``candidates(n)`` would then
have to step over up to N stale entries before it found n live ones. Here the heap holds
exactly the live items, and the first n in priority order are found by a best-first walk of
the heap tree that visits O(n) nodes: O(n log n), independent of N.

Priorities must be totally ordered and distinct (the policies append a unique tick).
"""

from __future__ import annotations

from heapq import heappop, heappush
from typing import Any, Generic, Iterator, TypeVar


class HeapItem:
    __slots__ = ("prio", "pos")

    def __init__(self, prio: Any) -> None:
        self.prio = prio
        self.pos = -1  # index in the heap list; -1 when not in a heap


H = TypeVar("H", bound=HeapItem)


class IndexedHeap(Generic[H]):
    """A heap of one kind of item (``IndexedHeap[_CostItem]``): what goes in is what comes out."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[H] = []  # _items[i].prio <= _items[2i+1].prio, _items[2i+2].prio

    def __len__(self) -> int:
        return len(self._items)

    def peek(self) -> H | None:
        return self._items[0] if self._items else None

    def push(self, item: H) -> None:
        item.pos = len(self._items)
        self._items.append(item)
        self._sift_up(item.pos)

    def update(self, item: H, prio: Any) -> None:
        old, item.prio = item.prio, prio
        if prio < old:
            self._sift_up(item.pos)
        else:
            self._sift_down(item.pos)

    def remove(self, item: H) -> None:
        items = self._items
        pos, last = item.pos, items.pop()
        item.pos = -1
        if last is item:
            return
        items[pos] = last
        last.pos = pos
        if pos > 0 and last.prio < items[(pos - 1) >> 1].prio:
            self._sift_up(pos)
        else:
            self._sift_down(pos)

    def ordered(self) -> Iterator[H]:
        """Items in increasing priority, lazily; read-only. Do not resume it after a mutation.

        Best-first walk of the heap tree: the frontier holds the children of the items
        already yielded, so k items cost O(k log k).
        """
        items = self._items
        if not items:
            return
        size = len(items)
        frontier = [(items[0].prio, 0)]
        while frontier:
            _, pos = heappop(frontier)
            yield items[pos]
            child = 2 * pos + 1
            if child < size:
                heappush(frontier, (items[child].prio, child))
                if child + 1 < size:
                    heappush(frontier, (items[child + 1].prio, child + 1))

    def _sift_up(self, pos: int) -> None:
        items = self._items
        item = items[pos]
        while pos > 0:
            parent_pos = (pos - 1) >> 1
            parent = items[parent_pos]
            if not item.prio < parent.prio:
                break
            items[pos] = parent
            parent.pos = pos
            pos = parent_pos
        items[pos] = item
        item.pos = pos

    def _sift_down(self, pos: int) -> None:
        items = self._items
        size = len(items)
        item = items[pos]
        while True:
            child = 2 * pos + 1
            if child >= size:
                break
            if child + 1 < size and items[child + 1].prio < items[child].prio:
                child += 1
            if not items[child].prio < item.prio:
                break
            items[pos] = items[child]
            items[pos].pos = pos
            pos = child
        items[pos] = item
        item.pos = pos
