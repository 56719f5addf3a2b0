"""The ``BlockPolicy`` protocol: which block leaves one tier of a ``TieredStore``.

kvstore owns this contract, beside ``StorageTier`` and ``Codec``; the built-in policies (LRU, LFU,
S3-FIFO, cost-aware, tenant-fair) live in ``kvtier.eviction.blocks`` and implement it.

A block policy decides which block leaves ONE tier. The store owns one instance per tier and
tells it what happens (``on_insert`` / ``on_access`` / ``on_remove``); it asks ``candidates(n)``
for the best victims, filters out the pinned ones and the ones whose children are still resident
(leaf-first), and calls ``on_remove`` for the blocks it really evicts.

Contract (checked for every registered policy by ``tests/contracts/test_block_policy_contract.py``):

- ``candidates(n)`` is side-effect free: it may be called any number of times with any ``n`` and
  the policy behaves afterwards exactly as if it had never been called;
- ``candidates(k) == candidates(m)[:k]`` for ``k <= m``, the keys are distinct and tracked, and
  ``candidates(n)`` for ``n >= len(policy)`` lists every tracked key;
- evicting in order is consistent: after ``on_remove(candidates(m)[0])``,
  ``candidates(m - 1) == old candidates(m)[1:]``;
- inserting a tracked key counts as an access (a key names one block: the ``nbytes``, ``depth``
  and ``tenant`` of its first insert stay); accessing or removing an unknown key is ignored;
- memory is bounded by a constant times the number of tracked keys.

Policies are not thread-safe: the store serialises calls to one instance.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class BlockPolicy(Protocol):
    name: str

    def on_insert(self, key: bytes, nbytes: int, *, depth: int = 0, tenant: str = "") -> None:
        """``key`` is newly resident in this tier (``depth``: index of the block in its chain)."""

    def on_access(self, key: bytes) -> None:
        """A hit on ``key``; an unknown key is ignored."""

    def on_remove(self, key: bytes) -> None:
        """``key`` left the tier (evicted or deleted); an unknown key is ignored."""

    def candidates(self, n: int) -> list[bytes]:
        """Up to ``n`` tracked keys in eviction order, best victim first; side-effect free."""

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...
