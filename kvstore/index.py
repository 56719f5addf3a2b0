"""PrefixIndex: what the store knows about every cached block, in struct-of-arrays form.

Each known block has a slot. Per slot the index keeps its parent slot, its depth in the chain,
a residency bitmask (bit t: resident in tier t), the number of its children resident in each
tier and in any tier, its pin count, its tenant and spec ids, and a last-access tick.

Why arrays and not one object per block: with a million blocks an object per block costs
~400 B of Python overhead; numpy columns cost ~45 B and let quota eviction scan a tenant's blocks
with vectorised masks. The only per-block Python objects are the dict entry key->slot and the
32-byte key itself.

Invariants (checked by tests):
- a slot is live iff ``_keys[slot] is not None``; live slots are exactly ``_slot_of.values()``;
- ``child_count[p, t]`` = number of live slots whose parent is ``p`` and that are resident in t;
  ``child_any[p]`` likewise for "resident in any tier";
- ``child_live[p]`` = number of live slots whose parent is ``p``; an entry is removed only when it
  is resident nowhere, unpinned and has no live child, so parent links never dangle;
- a block that is resident nowhere stays in the index only while something below it is
  (a "ghost" ancestor), and goes as soon as its last child entry goes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_TIERS = 8
NO_PARENT = -1


class PrefixIndex:
    def __init__(self, num_tiers: int, initial_capacity: int = 1024) -> None:
        if not 1 <= num_tiers <= MAX_TIERS:
            raise ValueError(f"num_tiers must be in [1, {MAX_TIERS}], got {num_tiers}")
        self.num_tiers = num_tiers
        self._slot_of: dict[bytes, int] = {}
        self._keys: list[bytes | None] = []
        self._free: list[int] = []
        self._tick_counter = 0
        cap = max(16, int(initial_capacity))
        self._parent: np.ndarray = np.full(cap, NO_PARENT, dtype=np.int32)
        self._depth: np.ndarray = np.zeros(cap, dtype=np.int32)
        self._resident: np.ndarray = np.zeros(cap, dtype=np.uint8)
        self._child_count: np.ndarray = np.zeros((cap, num_tiers), dtype=np.int32)
        self._child_any: np.ndarray = np.zeros(cap, dtype=np.int32)
        self._child_live: np.ndarray = np.zeros(cap, dtype=np.int32)
        self._pins: np.ndarray = np.zeros(cap, dtype=np.int32)
        self._tenant: np.ndarray = np.zeros(cap, dtype=np.int16)
        self._spec: np.ndarray = np.zeros(cap, dtype=np.int16)
        self._tick: np.ndarray = np.zeros(cap, dtype=np.int64)
        # generation of a slot's entry: a new entry, or one removed from every tier, gets a new number,
        # so a copy planned before a delete (and a rewrite of the key) can tell it is outdated
        self._gen: np.ndarray = np.zeros(cap, dtype=np.int64)

    # -- size ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: object) -> bool:
        return key in self._slot_of

    @property
    def capacity(self) -> int:
        return self._parent.shape[0]

    def _grow(self) -> None:
        old = self.capacity
        new = old * 2

        def grow(a: np.ndarray, fill=0) -> np.ndarray:
            b = np.full((new,) + a.shape[1:], fill, dtype=a.dtype)
            b[:old] = a
            return b

        self._parent = grow(self._parent, NO_PARENT)
        self._depth = grow(self._depth)
        self._resident = grow(self._resident)
        self._child_count = grow(self._child_count)
        self._child_any = grow(self._child_any)
        self._child_live = grow(self._child_live)
        self._pins = grow(self._pins)
        self._tenant = grow(self._tenant)
        self._spec = grow(self._spec)
        self._tick = grow(self._tick)
        self._gen = grow(self._gen)

    # -- entries ---------------------------------------------------------------------------
    def slot(self, key: bytes) -> int | None:
        return self._slot_of.get(key)

    def live_items(self) -> list[tuple[bytes, int]]:
        """(key, slot) of every live entry (a snapshot)."""
        return list(self._slot_of.items())

    def key(self, slot: int) -> bytes:
        k = self._keys[slot]
        if k is None:
            raise RuntimeError(f"slot {slot} is not live")
        return k

    def add(self, key: bytes, parent_slot: int = NO_PARENT, *, depth: int = 0, spec_id: int = 0, tenant_id: int = 0) -> int:
        """The slot of ``key``, creating a (not yet resident) entry when it is new."""
        slot = self._slot_of.get(key)
        if slot is not None:
            return slot
        if self._free:
            slot = self._free.pop()
            self._keys[slot] = key
        else:
            slot = len(self._keys)
            if slot >= self.capacity:
                self._grow()
            self._keys.append(key)
        self._slot_of[key] = slot
        self._gen[slot] += 1
        self._parent[slot] = parent_slot
        self._depth[slot] = depth
        self._resident[slot] = 0
        self._child_count[slot] = 0
        self._child_any[slot] = 0
        self._child_live[slot] = 0
        if parent_slot != NO_PARENT:
            if self._keys[parent_slot] is None:
                raise RuntimeError(f"parent slot {parent_slot} is not live")
            self._child_live[parent_slot] += 1
        self._pins[slot] = 0
        self._tenant[slot] = tenant_id
        self._spec[slot] = spec_id
        self.touch(slot)
        return slot

    def generation(self, slot: int) -> int:
        """Changes whenever the entry at ``slot`` is created or removed from every tier."""
        return int(self._gen[slot])

    def new_generation(self, slot: int) -> None:
        """The entry's bytes changed elsewhere (another instance rewrote it): copies planned before are outdated."""
        self._gen[slot] += 1

    def touch(self, slot: int) -> None:
        self._tick_counter += 1
        self._tick[slot] = self._tick_counter

    def set_resident(self, slot: int, tier: int, resident: bool) -> None:
        """Mark ``slot`` resident (or not) in ``tier`` and keep the parent's child counts."""
        bit = np.uint8(1 << tier)
        was = int(self._resident[slot])
        now = (was | int(bit)) if resident else (was & ~int(bit))
        if now == was:
            return
        self._resident[slot] = now
        parent = int(self._parent[slot])
        if parent != NO_PARENT:
            self._child_count[parent, tier] += 1 if resident else -1
            if was == 0 and now != 0:
                self._child_any[parent] += 1
            elif was != 0 and now == 0:
                self._child_any[parent] -= 1
        if now == 0:
            self._gen[slot] += 1  # removed everywhere: what comes under this key next is another block
            self._collect(slot)

    def _collect(self, slot: int) -> None:
        """Drop ``slot`` and its ancestors while they are resident nowhere, unpinned and childless."""
        while (
            slot != NO_PARENT
            and self._keys[slot] is not None
            and self._resident[slot] == 0
            and self._child_live[slot] == 0
            and self._pins[slot] == 0
        ):
            parent = int(self._parent[slot])
            key = self._keys[slot]
            assert key is not None  # the loop condition
            del self._slot_of[key]
            self._keys[slot] = None
            self._free.append(slot)
            self._parent[slot] = NO_PARENT
            if parent != NO_PARENT:
                self._child_live[parent] -= 1
            slot = parent

    def release_if_unused(self, slot: int) -> None:
        """Forget an entry that was added but never became resident (e.g. a refused put)."""
        if self._keys[slot] is not None and self._resident[slot] == 0:
            self._collect(slot)

    # -- queries ---------------------------------------------------------------------------
    def slots(self, keys: Sequence[bytes]) -> list[int]:
        get = self._slot_of.get
        return [get(k, -1) for k in keys]

    def residency(self, slot: int) -> int:
        return int(self._resident[slot])

    def residency_of(self, keys: Sequence[bytes]) -> np.ndarray:
        """Bitmask per key (0 for unknown keys)."""
        s = np.fromiter(self.slots(keys), dtype=np.int64, count=len(keys))
        out: np.ndarray = np.zeros(len(keys), dtype=np.uint8)
        known = s >= 0
        out[known] = self._resident[s[known]]
        return out

    def residency_list(self, keys: Sequence[bytes]) -> list[int]:
        """``residency_of`` as plain ints: cheaper for a short chain (a lookup's) than numpy's calls."""
        get, resident = self._slot_of.get, self._resident
        out = []
        for k in keys:
            s = get(k)
            out.append(0 if s is None else int(resident[s]))
        return out

    def longest_prefix(self, keys: Sequence[bytes], tier: int | None = None) -> int:
        """Number of leading keys resident (in ``tier``, or in any tier when None)."""
        if not keys:
            return 0
        masks = self.residency_of(keys)
        held = masks != 0 if tier is None else (masks & (1 << tier)) != 0
        misses = np.flatnonzero(~held)
        return int(misses[0]) if misses.size else len(keys)

    def is_evictable(self, slot: int, tier: int) -> bool:
        """Not pinned, and no child of it resident in ``tier`` (leaf-first)."""
        return self._pins[slot] == 0 and self._child_count[slot, tier] == 0

    def depth(self, slot: int) -> int:
        return int(self._depth[slot])

    def parent(self, slot: int) -> int:
        return int(self._parent[slot])

    def spec_id(self, slot: int) -> int:
        return int(self._spec[slot])

    def tenant_id(self, slot: int) -> int:
        return int(self._tenant[slot])

    def pin(self, slot: int) -> None:
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        if self._pins[slot] <= 0:
            raise RuntimeError(f"unpin of slot {slot} that is not pinned")
        self._pins[slot] -= 1
        if self._pins[slot] == 0 and self._resident[slot] == 0:
            self._collect(slot)

    def pinned(self, slot: int) -> bool:
        return bool(self._pins[slot] > 0)

    def tenant_leaves_oldest_first(self, tenant_id: int) -> list[int]:
        """Resident, unpinned blocks of a tenant with no resident child, least recent first."""
        n = len(self._keys)
        mask = (self._tenant[:n] == tenant_id) & (self._resident[:n] != 0) & (self._pins[:n] == 0) & (self._child_any[:n] == 0)
        idx = np.flatnonzero(mask)
        return idx[np.argsort(self._tick[idx], kind="stable")].tolist()

    def check_invariants(self) -> None:
        """Recount children from parents and compare (RuntimeError on a mismatch). For tests."""
        n = len(self._keys)
        live = np.array([k is not None for k in self._keys], dtype=bool)
        if live.sum() != len(self._slot_of):
            raise RuntimeError("live slots and key map disagree")
        counts: np.ndarray = np.zeros((n, self.num_tiers), dtype=np.int64)
        anyc: np.ndarray = np.zeros(n, dtype=np.int64)
        livec: np.ndarray = np.zeros(n, dtype=np.int64)
        for s in np.flatnonzero(live):
            p = self._parent[s]
            if p == NO_PARENT:
                continue
            if not live[p]:
                raise RuntimeError(f"slot {s} has a dangling parent {p}")
            livec[p] += 1
            r = int(self._resident[s])
            for t in range(self.num_tiers):
                if r & (1 << t):
                    counts[p, t] += 1
            if r:
                anyc[p] += 1
        if (
            not np.array_equal(counts[live], self._child_count[:n][live])
            or not np.array_equal(anyc[live], self._child_any[:n][live])
            or not np.array_equal(livec[live], self._child_live[:n][live])
        ):
            raise RuntimeError("child counts disagree with parent links")
        ghosts = live & (self._resident[:n] == 0) & (self._child_live[:n] == 0) & (self._pins[:n] == 0)
        if ghosts.any():
            raise RuntimeError(f"{int(ghosts.sum())} entries are resident nowhere and hold nothing below them")
