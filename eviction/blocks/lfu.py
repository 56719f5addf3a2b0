"""LFU: least frequently used first, ties broken by least recent use.

Structure (O(1) per operation): a doubly linked list of frequency buckets in increasing
frequency, only non-empty buckets linked; each bucket is an ``OrderedDict key -> tick`` in
order of last use. A hit moves the key from bucket f to bucket f+1 (created next to f when
missing) and appends it there. Appending keeps every bucket sorted by last use, because the
moved key's use is the newest of all. So the eviction order is the buckets from the lowest
frequency, each oldest first, and ``candidates(n)`` is O(n): every bucket walked yields a key.
"""

from __future__ import annotations

from collections import OrderedDict

from .base import PolicyBase, check_insert, register_policy


class _Bucket:
    __slots__ = ("freq", "keys", "prev", "next")

    def __init__(self, freq: int, prev: "_Bucket | None", next: "_Bucket | None") -> None:
        self.freq = freq
        self.keys: OrderedDict[bytes, int] = OrderedDict()  # key -> tick of last use, oldest first
        self.prev = prev
        self.next = next


@register_policy
class LFUPolicy(PolicyBase):
    """Least frequently used first; ties by least recent use. No options.

    An insert counts as the first use (frequency 1); frequencies are not capped and are
    forgotten when the key leaves the tier.
    """

    __slots__ = ("_head", "_bucket_of", "_tick")
    name = "lfu"

    def __init__(self) -> None:
        self._head = _Bucket(0, None, None)  # sentinel; never holds keys
        self._bucket_of: dict[bytes, _Bucket] = {}
        self._tick = 0

    def get_priority(self, key: bytes) -> tuple[int, int] | None:
        """``(frequency, tick of last use)``: lower leaves first. None for an unknown key."""
        b = self._bucket_of.get(key) if isinstance(key, bytes) else None
        return None if b is None else (b.freq, b.keys[key])

    def _bucket_after(self, b: _Bucket, freq: int) -> _Bucket:
        nxt = b.next
        if nxt is not None and nxt.freq == freq:
            return nxt
        new = _Bucket(freq, b, nxt)
        b.next = new
        if nxt is not None:
            nxt.prev = new
        return new

    def _discard(self, key: bytes, b: _Bucket) -> None:
        del b.keys[key]
        if not b.keys:  # unlink: the list holds only non-empty buckets
            assert b.prev is not None  # only the sentinel has no prev, and it never holds keys
            b.prev.next = b.next
            if b.next is not None:
                b.next.prev = b.prev

    def on_insert(self, key: bytes, nbytes: int, *, depth: int = 0, tenant: str = "") -> None:
        check_insert(key, nbytes, depth, tenant)
        if key in self._bucket_of:
            self.on_access(key)
            return
        self._tick += 1
        b = self._bucket_after(self._head, 1)
        b.keys[key] = self._tick
        self._bucket_of[key] = b

    def on_access(self, key: bytes) -> None:
        b = self._bucket_of.get(key) if isinstance(key, bytes) else None
        if b is None:
            return
        self._tick += 1
        nb = self._bucket_after(b, b.freq + 1)  # before _discard, which may unlink b
        self._discard(key, b)
        nb.keys[key] = self._tick
        self._bucket_of[key] = nb

    def on_remove(self, key: bytes) -> None:
        b = self._bucket_of.pop(key, None) if isinstance(key, bytes) else None
        if b is not None:
            self._discard(key, b)

    def _candidates(self, n: int) -> list[bytes]:  # O(n)
        out: list[bytes] = []
        b = self._head.next
        while b is not None:
            for key in b.keys:
                out.append(key)
                if len(out) == n:
                    return out
            b = b.next
        return out

    def __len__(self) -> int:
        return len(self._bucket_of)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and key in self._bucket_of
