"""TieredStore: ordered tiers (fastest first) behind one batched API.

- ``put`` writes new blocks into the first tier with room (making room by evicting), and also
  into every tier configured ``write_through``; a write-through the tier refused (Redis down, no
  room) is remembered (bounded) and tried again, from the faster tier that holds the block, at
  later puts once the tier is available again (``retry_write_through`` does it on demand);
- eviction from tier t picks victims with that tier's ``BlockPolicy``, skipping pinned blocks and
  blocks whose children are still resident in t (leaf-first), and demotes them to tier t+1
  (write-back) unless t+1 already holds them;
- ``get`` reads each block from the fastest tier that holds it and promotes it to tier 0;
- high/low watermarks give hysteresis: a tier above ``high`` of its capacity is brought down to
  ``low``; no tier ever holds more than its capacity;
- per-tenant byte quotas (logical bytes, each block counted once) evict the tenant's own least
  recently used blocks first, so one tenant cannot push out another;
- pins are leases with a TTL; an event stream (stored / removed per tier, monotonic ids) lets a
  router follow what is where.

A tier's policy is a ``BlockPolicy`` (``kvtier.kvstore.policy``, the contract kvstore owns) or the
name of a built-in one (``"lru"``, ``"s3fifo"``, ...). The built-ins live in ``kvtier.eviction.blocks``,
which imports kvstore; a name is therefore resolved at run time by importing that package (the one
place kvstore reaches above itself, and only when given a name): pass an instance to avoid it.
"""

from __future__ import annotations

import heapq
import importlib
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .index import NO_PARENT, PrefixIndex
from .keys import BlockHash, Namespace, chain_hashes, check_keys
from .policy import BlockPolicy
from .spec import KVSpec
from .tiers.base import StorageTier

log = logging.getLogger(__name__)

# Frame header and msgpack framing on top of a block's payload, reserved when making room.
_FRAME_SLACK = 1024


def _resolve_policy(policy: BlockPolicy | str) -> BlockPolicy:
    """An instance as it is; a name through the built-in policies' registry (``kvtier.eviction.blocks``)."""
    if not isinstance(policy, str):
        if not isinstance(policy, BlockPolicy):
            raise ValueError(f"policy must be a BlockPolicy or the name of a built-in one, got {type(policy).__name__}")
        return policy
    builtins = importlib.import_module("kvtier.eviction.blocks")  # imports kvstore: resolved lazily, see the module doc
    return builtins.get_policy(policy)


@dataclass
class TierConfig:
    """One tier of a store and how the store treats it."""

    tier: StorageTier
    policy: BlockPolicy | str = "lru"  # a BlockPolicy, or the name of a built-in one (kvtier.eviction.blocks)
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    write_through: bool = False  # every put is also written here at once (then eviction above needs no write)

    def __post_init__(self) -> None:
        if not (0.0 < self.low_watermark <= self.high_watermark <= 1.0):
            raise ValueError(
                f"watermarks must satisfy 0 < low <= high <= 1, got low={self.low_watermark}, high={self.high_watermark}"
            )


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


@dataclass(frozen=True)
class LookupResult:
    num_blocks: int  # longest cached prefix of the chain, in blocks, over all tiers
    tier_prefix: dict[str, int]  # longest prefix held by each tier on its own
    tier_hits: dict[str, int]  # of the first num_blocks, how many each tier would serve (the fastest holder)

    @property
    def num_tokens_for(self) -> Callable[[int], int]:
        return lambda block_tokens: self.num_blocks * block_tokens


@dataclass(frozen=True)
class Lease:
    id: int
    expires_at: float
    num_pinned: int


@dataclass
class _Tier:
    cfg: TierConfig
    policy: BlockPolicy
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    # write-through only: keys the tier refused, oldest first, to be written again later
    pending: OrderedDict = field(default_factory=OrderedDict)
    wt_retried: int = 0  # pending blocks written on a later try
    wt_dropped: int = 0  # pending keys forgotten because the list was full

    @property
    def tier(self) -> StorageTier:
        return self.cfg.tier


@dataclass
class _Item:
    slot: int
    key: bytes
    block: torch.Tensor
    spec: KVSpec


@dataclass
class _LeaseState:
    slots: list[int]
    expires_at: float


class TieredStore:
    def __init__(
        self,
        tiers: Sequence[TierConfig | StorageTier],
        *,
        quotas: dict[str, int] | None = None,
        promote_on_hit: bool = True,
        max_events: int = 100_000,
        max_pin_ttl_s: float = 3600.0,
        max_write_through_pending: int = 4096,
        write_through_retry_batch: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_write_through_pending``: refused write-throughs remembered per tier (the oldest are
        forgotten beyond it; they still reach the tier when evicted from above); at most
        ``write_through_retry_batch`` of them are tried again per ``put``."""
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        cfgs = [t if isinstance(t, TierConfig) else TierConfig(t) for t in tiers]
        names = [c.tier.name for c in cfgs]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self._tiers = [_Tier(c, _resolve_policy(c.policy)) for c in cfgs]
        self._index = PrefixIndex(len(cfgs))
        self._quotas = dict(quotas or {})
        for tenant, q in self._quotas.items():
            if not isinstance(q, int) or q < 0:
                raise ValueError(f"quota of tenant {tenant!r} must be a non-negative int of bytes, got {q!r}")
        for name, v in (("max_write_through_pending", max_write_through_pending), ("write_through_retry_batch", write_through_retry_batch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        self.max_write_through_pending = max_write_through_pending
        self.write_through_retry_batch = write_through_retry_batch
        self.promote_on_hit = promote_on_hit
        self.max_pin_ttl_s = max_pin_ttl_s
        self._clock = clock
        self._lock = threading.RLock()
        self._specs: list[KVSpec] = []
        self._spec_ids: dict[KVSpec, int] = {}
        self._tenants: list[str] = []
        self._tenant_ids: dict[str, int] = {}
        self._tenant_bytes: dict[str, int] = {}
        self._events: deque[Event] = deque(maxlen=max_events)
        self._event_ids = itertools.count(1)
        self._last_event_id = 0
        self._leases: dict[int, _LeaseState] = {}
        self._lease_heap: list[tuple[float, int]] = []
        self._lease_ids = itertools.count(1)
        self.quota_evictions = 0
        self.quota_refusals = 0
        self._adopt_persistent()

    # -- small registries ------------------------------------------------------------------
    def _spec_id(self, spec: KVSpec) -> int:
        sid = self._spec_ids.get(spec)
        if sid is None:
            sid = len(self._specs)
            self._specs.append(spec)
            self._spec_ids[spec] = sid
        return sid

    def _tenant_id(self, tenant: str) -> int:
        tid = self._tenant_ids.get(tenant)
        if tid is None:
            tid = len(self._tenants)
            self._tenants.append(tenant)
            self._tenant_ids[tenant] = tid
        return tid

    @property
    def tier_names(self) -> list[str]:
        return [t.tier.name for t in self._tiers]

    @property
    def has_shared_tier(self) -> bool:
        """Whether a tier is shared with other processes (Redis): then the in-memory index alone
        cannot answer a lookup."""
        return any(t.tier.capabilities.shared for t in self._tiers)

    @property
    def index(self) -> PrefixIndex:
        return self._index

    def register_spec(self, spec: KVSpec) -> None:
        """Make a spec known, and adopt blocks of it found in persistent tiers (e.g. disk after a restart)."""
        with self._lock:
            self._spec_id(spec)
            self._adopt_persistent(spec)

    def _adopt_persistent(self, spec: KVSpec | None = None) -> None:
        """Index blocks that persistent, non-shared tiers already hold (found again after a restart)."""
        specs = [spec] if spec is not None else list(self._specs)
        for t, st in enumerate(self._tiers):
            tier = st.tier
            caps = tier.capabilities
            if not (caps.persistent and caps.iterable and not caps.shared):
                continue
            for sp in specs:
                sid = self._spec_id(sp)
                for key in tier.iter_keys(sp):
                    slot = self._index.slot(key)
                    if slot is not None and self._index.residency(slot) & (1 << t):
                        continue
                    slot = self._index.add(key, NO_PARENT, spec_id=sid, tenant_id=self._tenant_id(""))
                    self._mark_stored(t, slot, key, sp, nbytes=sp.block_nbytes, depth=0, tenant="")

    # -- events ----------------------------------------------------------------------------
    def _emit(self, kind: str, key: bytes, tier: int, spec: KVSpec) -> None:
        eid = next(self._event_ids)
        self._last_event_id = eid
        self._events.append(Event(eid, kind, key, self._tiers[tier].tier.name, spec.short_fingerprint, time.time()))

    def events(self, after: int = 0, limit: int = 1000) -> list[Event]:
        """Events with id > ``after``, oldest first, at most ``limit`` (the stream keeps the last ``max_events``)."""
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        with self._lock:
            out = []
            for ev in self._events:
                if ev.id > after:
                    out.append(ev)
                    if len(out) >= limit:
                        break
            return out

    @property
    def last_event_id(self) -> int:
        return self._last_event_id

    # -- residency bookkeeping -------------------------------------------------------------
    def _mark_stored(self, t: int, slot: int, key: bytes, spec: KVSpec, *, nbytes: int, depth: int, tenant: str) -> None:
        idx = self._index
        if idx.residency(slot) == 0:
            self._tenant_bytes[tenant] = self._tenant_bytes.get(tenant, 0) + spec.block_nbytes
        idx.set_resident(slot, t, True)
        self._tiers[t].policy.on_insert(key, nbytes, depth=depth, tenant=tenant)
        self._emit("stored", key, t, spec)

    def _mark_removed(self, t: int, slot: int, key: bytes, spec: KVSpec) -> None:
        idx = self._index
        tenant = self._tenants[idx.tenant_id(slot)]
        self._tiers[t].policy.on_remove(key)
        idx.set_resident(slot, t, False)  # may drop the entry (and ghost ancestors) from the index
        if idx.slot(key) is None or idx.residency(idx.slot(key)) == 0:
            self._tenant_bytes[tenant] = self._tenant_bytes.get(tenant, 0) - spec.block_nbytes
        self._emit("removed", key, t, spec)

    # -- writing ---------------------------------------------------------------------------
    def _need(self, t: int, spec: KVSpec) -> int:
        tier = self._tiers[t].tier
        return spec.block_nbytes + (_FRAME_SLACK if tier.capabilities.framed else 0)

    def _write(self, t: int, items: list[_Item], *, cascade: bool = True) -> None:
        """Store ``items`` in tier t (making room); what t refuses goes on to t+1 when ``cascade``."""
        if not items:
            return
        st = self._tiers[t]
        tier = st.tier
        cap = tier.capacity_bytes
        refused: list[_Item] = []
        # chunks whose size fits the tier, so a batch larger than a tier still goes through
        chunk: list[_Item] = []
        chunk_need = 0
        chunks: list[tuple[list[_Item], int]] = []
        for it in items:
            need = self._need(t, it.spec)
            if cap is not None and need > cap:
                refused.append(it)
                continue
            if cap is not None and chunk and chunk_need + need > cap * st.cfg.low_watermark:
                chunks.append((chunk, chunk_need))
                chunk, chunk_need = [], 0
            chunk.append(it)
            chunk_need += need
        if chunk:
            chunks.append((chunk, chunk_need))
        for chunk, need in chunks:
            if cap is not None:
                self._make_room(t, need, protect={it.slot for it in chunk})
            by_spec: dict[KVSpec, list[_Item]] = {}
            for it in chunk:
                by_spec.setdefault(it.spec, []).append(it)
            for spec, group in by_spec.items():
                # a block with no known parent is a sequence's first: codecs that keep its sinks exact do so
                first = [self._index.depth(it.slot) == 0 for it in group]
                sizes = tier.put([it.key for it in group], [it.block for it in group], spec=spec, first=first)
                stored = []
                for it, size in zip(group, sizes):
                    if size > 0:
                        stored.append((it, size))
                    else:
                        refused.append(it)
                # deepest block first, so that recency-based policies age the chain's tail first
                for it, size in reversed(stored):
                    if self._index.slot(it.key) is None:  # evicted from the index meanwhile: re-add
                        continue
                    if not self._index.residency(it.slot) & (1 << t):
                        self._mark_stored(t, it.slot, it.key, spec, nbytes=size, depth=self._index.depth(it.slot), tenant=self._tenants[self._index.tenant_id(it.slot)])
        if refused and cascade and t + 1 < len(self._tiers):
            self._write(t + 1, refused)

    # -- write-through retries ---------------------------------------------------------------
    def _remember_refused(self, t: int, items: list[_Item]) -> None:
        """Note the items tier t (write-through) did not take but a faster tier holds."""
        st, idx = self._tiers[t], self._index
        if not self.max_write_through_pending:
            return
        for it in items:
            slot = idx.slot(it.key)
            if slot != it.slot or not idx.residency(slot) or idx.residency(slot) & (1 << t):
                continue
            st.pending[it.key] = None
            st.pending.move_to_end(it.key)
            while len(st.pending) > self.max_write_through_pending:
                st.pending.popitem(last=False)
                st.wt_dropped += 1

    def _retry_pending(self, t: int, limit: int | None) -> int:
        """Write up to ``limit`` pending blocks into tier t, oldest first, each read from the fastest
        tier holding it; stops at the first refusal (the tier is down or full). Returns how many landed."""
        st, idx = self._tiers[t], self._index
        if not getattr(st.tier, "available", True):
            return 0
        landed = tried = 0
        while st.pending and (limit is None or tried < limit):
            key = next(iter(st.pending))
            slot = idx.slot(key)
            res = idx.residency(slot) if slot is not None else 0
            if not res or res & (1 << t):  # gone everywhere, or already there (demoted meanwhile)
                del st.pending[key]
                continue
            spec = self._specs[idx.spec_id(slot)]
            src = (res & -res).bit_length() - 1  # the fastest tier holding it
            block = self._tiers[src].tier.get([key], spec=spec)[0]
            tried += 1
            if block is None:  # that tier lost it (e.g. a corrupt frame): nothing to copy from
                del st.pending[key]
                continue
            idx.pin(slot)
            try:
                self._write(t, [_Item(slot, key, block, spec)], cascade=False)
            finally:
                if idx.slot(key) == slot:
                    idx.unpin(slot)
            s2 = idx.slot(key)
            if s2 is None or not idx.residency(s2) & (1 << t):
                break  # refused again: keep it, try later
            del st.pending[key]
            st.wt_retried += 1
            landed += 1
        return landed

    def write_through_pending(self) -> int:
        """Blocks write-through tiers refused and that wait for another try (all such tiers)."""
        with self._lock:
            return sum(len(st.pending) for st in self._tiers)

    def retry_write_through(self, limit: int | None = None) -> int:
        """Try now to write the blocks that write-through tiers refused (all of them, or ``limit``
        per tier). Returns how many landed; ``stats()`` shows what is still pending."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
        with self._lock:
            return sum(self._retry_pending(t, limit) for t, st in enumerate(self._tiers) if t > 0 and st.cfg.write_through)

    def _make_room(self, t: int, need: int, protect: set[int] = frozenset()) -> None:
        """Evict from tier t until ``need`` more bytes fit under the low watermark (hysteresis)."""
        st = self._tiers[t]
        tier = st.tier
        cap = tier.capacity_bytes
        if cap is None or tier.used_bytes + need <= cap * st.cfg.high_watermark:
            return
        # after the write the tier sits at its low watermark (hysteresis: the next writes need no eviction)
        target = max(0, int(cap * st.cfg.low_watermark) - need)
        idx = self._index
        n = 16
        while tier.used_bytes > target:
            cands = st.policy.candidates(n)
            victims = []
            for key in cands:
                slot = idx.slot(key)
                if slot is not None and slot not in protect and idx.is_evictable(slot, t):
                    victims.append((slot, key))
            if victims:
                self._evict(t, victims, stop_at=target)
            elif len(cands) < n:
                return  # the whole order was seen and nothing is evictable: the put is refused here
            else:
                n *= 2  # the head of the order is pinned or has resident children: look further

    def _evict(self, t: int, victims: list[tuple[int, bytes]], *, stop_at: int | None = None) -> None:
        """Evict victims from tier t in order (until used <= stop_at), demoting them to t+1."""
        st = self._tiers[t]
        tier = st.tier
        nxt = t + 1 if t + 1 < len(self._tiers) else None
        for slot, key in victims:
            if stop_at is not None and tier.used_bytes <= stop_at:
                break
            if self._index.slot(key) != slot or not self._index.residency(slot) & (1 << t):
                continue
            spec = self._specs[self._index.spec_id(slot)]
            if nxt is not None and not self._index.residency(slot) & (1 << nxt):
                block = tier.get([key], spec=spec)[0]
                if block is not None:
                    self._write(nxt, [_Item(slot, key, block, spec)])
                    if self._index.slot(key) == slot and self._index.residency(slot) & (1 << nxt):
                        st.demotions += 1
            tier.remove([key], spec=spec)
            if self._index.slot(key) == slot:
                self._mark_removed(t, slot, key, spec)
            st.evictions += 1

    def _remove_everywhere(self, slot: int, key: bytes) -> None:
        spec = self._specs[self._index.spec_id(slot)]
        for t in range(len(self._tiers)):
            if self._index.slot(key) != slot:
                return
            if self._index.residency(slot) & (1 << t):
                self._tiers[t].tier.remove([key], spec=spec)
                self._mark_removed(t, slot, key, spec)

    def _charge_quota(self, tenant: str, nbytes: int) -> bool:
        """Make room under ``tenant``'s quota by evicting its own oldest leaves; False if impossible."""
        quota = self._quotas.get(tenant)
        if quota is None:
            return True
        if nbytes > quota:
            return False
        tid = self._tenant_id(tenant)
        while self._tenant_bytes.get(tenant, 0) + nbytes > quota:
            leaves = self._index.tenant_leaves_oldest_first(tid)
            if not leaves:
                return False
            for slot in leaves:
                if self._tenant_bytes.get(tenant, 0) + nbytes <= quota:
                    break
                self._remove_everywhere(slot, self._index.key(slot))
                self.quota_evictions += 1
        return True

    # -- public API ------------------------------------------------------------------------
    def put(
        self,
        spec: KVSpec,
        keys: Sequence[bytes],
        blocks: Sequence[torch.Tensor] | torch.Tensor,
        *,
        tenant: str = "",
        parent: bytes | None = None,
    ) -> list[bool]:
        """Store a chain of blocks (``keys[i]``'s parent is ``keys[i-1]``; ``keys[0]``'s is ``parent``).

        Returns per key whether the block is now cached. Blocks already cached are left as they
        are (the key proves the content). A block refused by every tier (no room, quota) is
        reported False; nothing raises for lack of room. Invalid input raises ValueError before
        anything changes.
        """
        keys = check_keys(keys)
        if isinstance(blocks, torch.Tensor):
            if blocks.dim() != len(spec.block_shape) + 1:
                raise ValueError(f"a stacked batch of blocks must be [N, {', '.join(map(str, spec.block_shape))}], got {list(blocks.shape)}")
            blocks = list(blocks.unbind(0))
        if len(blocks) != len(keys):
            raise ValueError(f"put needs one block per key: got {len(keys)} keys and {len(blocks)} blocks")
        for b in blocks:
            spec.check_block(b)
        with self._lock:
            self._expire_leases()
            sid = self._spec_id(spec)
            tid = self._tenant_id(tenant)
            idx = self._index
            parent_slot = idx.slot(bytes(parent)) if parent is not None else None
            depth = idx.depth(parent_slot) + 1 if parent_slot is not None else 0
            parent_slot = NO_PARENT if parent_slot is None else parent_slot
            result = [False] * len(keys)
            new_items: list[tuple[int, _Item]] = []
            for i, (key, block) in enumerate(zip(keys, blocks)):
                slot = idx.slot(key)
                if slot is not None and idx.residency(slot):
                    result[i] = True
                    parent_slot, depth = slot, idx.depth(slot) + 1
                    continue
                if not self._charge_quota(tenant, spec.block_nbytes):
                    self.quota_refusals += len(keys) - i
                    break
                slot = idx.add(key, parent_slot, depth=depth, spec_id=sid, tenant_id=tid)
                # count the bytes now so later blocks of this batch see them against the quota
                self._tenant_bytes[tenant] = self._tenant_bytes.get(tenant, 0) + spec.block_nbytes
                idx.pin(slot)  # held while the batch is written, so its own eviction cannot drop it
                new_items.append((i, _Item(slot, key, block, spec)))
                parent_slot, depth = slot, depth + 1
            # undo the provisional quota charge; _mark_stored charges what really lands
            for _ in new_items:
                self._tenant_bytes[tenant] -= spec.block_nbytes
            try:
                for t, st in enumerate(self._tiers):  # earlier refusals first, while the tier is up
                    if t > 0 and st.cfg.write_through and st.pending:
                        self._retry_pending(t, self.write_through_retry_batch)
                self._write(0, [it for _, it in new_items])
                for t, st in enumerate(self._tiers):
                    if t > 0 and st.cfg.write_through:
                        self._write(t, [it for _, it in new_items], cascade=False)
                        self._remember_refused(t, [it for _, it in new_items])
            finally:
                for _, it in reversed(new_items):
                    if idx.slot(it.key) == it.slot:
                        idx.unpin(it.slot)
            for i, it in new_items:
                s = idx.slot(it.key)
                result[i] = s is not None and idx.residency(s) != 0
            return result

    def get(
        self,
        spec: KVSpec,
        keys: Sequence[bytes],
        out: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor | None]:
        """Each block from the fastest tier that holds it (None: a miss); promotes hits to tier 0."""
        keys = check_keys(keys)
        if out is not None:
            if len(out) != len(keys):
                raise ValueError(f"get needs one out buffer per key: got {len(keys)} keys and {len(out)} buffers")
            for o in out:
                spec.check_block(o)
        with self._lock:
            self._expire_leases()
            sid = self._spec_id(spec)
            idx = self._index
            result: list[torch.Tensor | None] = [None] * len(keys)
            remaining = list(range(len(keys)))
            found_in: dict[int, int] = {}
            for t, st in enumerate(self._tiers):
                if not remaining:
                    break
                shared = st.tier.capabilities.shared
                ask = []
                for i in remaining:
                    slot = idx.slot(keys[i])
                    if slot is not None and idx.residency(slot) & (1 << t):
                        ask.append(i)
                    elif shared and (slot is None or idx.residency(slot) == 0):
                        ask.append(i)  # another instance may have written it
                if not ask:
                    continue
                got = st.tier.get([keys[i] for i in ask], spec=spec, out=[out[i] for i in ask] if out is not None else None)
                hit = set()
                for i, block in zip(ask, got):
                    slot = idx.slot(keys[i])
                    if block is None:
                        if slot is not None and idx.residency(slot) & (1 << t):
                            # it vanished (corrupt, expired, Redis down): forget it here, try below
                            self._mark_removed(t, slot, keys[i], spec)
                        continue
                    result[i] = block
                    found_in[i] = t
                    hit.add(i)
                    if slot is None or not idx.residency(slot) & (1 << t):
                        parent = idx.slot(keys[i - 1]) if i > 0 else None
                        slot = idx.add(keys[i], parent if parent is not None else NO_PARENT, spec_id=sid, tenant_id=self._tenant_id(""))
                        self._mark_stored(t, slot, keys[i], spec, nbytes=spec.block_nbytes, depth=0, tenant="")
                for i in reversed(ask):
                    if i in hit:
                        st.policy.on_access(keys[i])
                        idx.touch(idx.slot(keys[i]))
                remaining = [i for i in remaining if i not in hit]
            if self.promote_on_hit:
                items = []
                for i in sorted(i for i, t in found_in.items() if t > 0):
                    slot = idx.slot(keys[i])
                    if slot is not None:
                        items.append((found_in[i], _Item(slot, keys[i], result[i], spec)))
                for _, it in items:
                    idx.pin(it.slot)
                try:
                    self._write(0, [it for _, it in items], cascade=False)
                finally:
                    for _, it in items:
                        if idx.slot(it.key) == it.slot:
                            idx.unpin(it.slot)
                for t, it in items:
                    if idx.slot(it.key) == it.slot and idx.residency(it.slot) & 1:
                        self._tiers[t].promotions += 1
            return result

    def lookup(self, spec: KVSpec, keys: Sequence[bytes]) -> LookupResult:
        """Longest cached prefix of a chain, overall and per tier, in one call.

        Tiers private to this process answer from the index. A shared tier (Redis) is asked
        (one pipelined round trip): other instances add and remove blocks there, so what this
        process remembers of it may be stale in both directions.
        """
        keys = check_keys(keys)
        with self._lock:
            self._expire_leases()
            n = len(keys)
            masks = self._index.residency_of(keys)
            names = self.tier_names
            shared = [t for t, st in enumerate(self._tiers) if st.tier.capabilities.shared]
            local_bits = sum(1 << t for t in range(len(names)) if t not in shared)
            tier_prefix: dict[str, int] = {}
            for t, name in enumerate(names):
                if t in shared:
                    tier_prefix[name] = self._tiers[t].tier.contains_prefix(keys, spec=spec) if n else 0
                else:
                    m = ((masks & (1 << t)) == 0).nonzero()[0]
                    tier_prefix[name] = int(m[0]) if m.size else n
            local = masks & local_bits
            holder = [-1] * n  # the fastest tier that would serve each block
            for i, mask in enumerate(local.tolist()):
                if mask:
                    holder[i] = (mask & -mask).bit_length() - 1
            for t in shared:
                for i in range(tier_prefix[names[t]]):
                    if holder[i] < 0 or holder[i] > t:
                        holder[i] = t
            num = holder.index(-1) if -1 in holder else n
            hits = {name: 0 for name in names}
            for t in holder[:num]:
                hits[names[t]] += 1
            return LookupResult(num, tier_prefix, hits)

    def lookup_tokens(self, spec: KVSpec, token_ids, namespace: Namespace | None = None) -> tuple[list[BlockHash], LookupResult]:
        """Hash the full blocks of ``token_ids`` and look the chain up."""
        keys = chain_hashes(spec, token_ids, namespace)
        return keys, self.lookup(spec, keys)

    def contains_prefix(self, spec: KVSpec, keys: Sequence[bytes]) -> int:
        return self.lookup(spec, keys).num_blocks

    def remove(self, spec: KVSpec, keys: Sequence[bytes]) -> int:
        """Remove blocks from every tier; returns how many were cached."""
        keys = check_keys(keys)
        n = 0
        with self._lock:
            for key in keys:
                slot = self._index.slot(key)
                if slot is not None and self._index.residency(slot):
                    self._remove_everywhere(slot, key)
                    n += 1
                else:
                    for st in self._tiers:
                        if st.tier.capabilities.shared:
                            n += bool(st.tier.remove([key], spec=spec))
            return n

    # -- pins ------------------------------------------------------------------------------
    def pin(self, spec: KVSpec, keys: Sequence[bytes], ttl_s: float) -> Lease:
        """Pin the cached blocks among ``keys`` for ``ttl_s`` seconds (a lease): not evicted meanwhile."""
        keys = check_keys(keys)
        if not (isinstance(ttl_s, (int, float)) and 0 < ttl_s <= self.max_pin_ttl_s):
            raise ValueError(f"ttl_s must be in (0, {self.max_pin_ttl_s}], got {ttl_s!r}")
        with self._lock:
            self._expire_leases()
            slots = []
            for key in keys:
                slot = self._index.slot(key)
                if slot is not None and self._index.residency(slot):
                    self._index.pin(slot)
                    slots.append(slot)
            lease_id = next(self._lease_ids)
            expires = self._clock() + ttl_s
            self._leases[lease_id] = _LeaseState(slots, expires)
            heapq.heappush(self._lease_heap, (expires, lease_id))
            return Lease(lease_id, expires, len(slots))

    def unpin(self, lease_id: int) -> bool:
        """End a lease early; False if it is unknown or already expired."""
        with self._lock:
            state = self._leases.pop(lease_id, None)
            if state is None:
                return False
            for slot in state.slots:
                self._index.unpin(slot)
            return True

    def _expire_leases(self) -> None:
        now = self._clock()
        while self._lease_heap and self._lease_heap[0][0] <= now:
            _, lease_id = heapq.heappop(self._lease_heap)
            state = self._leases.pop(lease_id, None)
            if state is not None:
                for slot in state.slots:
                    self._index.unpin(slot)

    @property
    def num_leases(self) -> int:
        with self._lock:
            self._expire_leases()
            return len(self._leases)

    # -- stats -----------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            self._expire_leases()
            tiers = []
            for st in self._tiers:
                d = st.tier.stats().to_dict()
                d.update(
                    evictions=st.evictions,
                    demotions=st.demotions,
                    promotions=st.promotions,
                    write_through_pending=len(st.pending),
                    write_through_retried=st.wt_retried,
                    write_through_dropped=st.wt_dropped,
                    policy=getattr(st.policy, "name", type(st.policy).__name__),
                    device=st.tier.capabilities.device,
                )
                tiers.append(d)
            return {
                "tiers": tiers,
                "blocks": len(self._index),
                "tenant_bytes": {k: v for k, v in self._tenant_bytes.items() if v},
                "quota_evictions": self.quota_evictions,
                "quota_refusals": self.quota_refusals,
                "leases": len(self._leases),
                "last_event_id": self._last_event_id,
                "corrupt": sum(t["corrupt"] for t in tiers),
            }

    def tenant_bytes(self, tenant: str) -> int:
        with self._lock:
            return self._tenant_bytes.get(tenant, 0)

    def close(self) -> None:
        for st in self._tiers:
            st.tier.close()
