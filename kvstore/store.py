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

Locking: one lock guards the bookkeeping only (the ``PrefixIndex``, the policies, leases, the
tenant ledger, the write-through queues, per-tier byte reservations); no tier is called under it.
Every operation that moves bytes is planned under the lock (victims chosen and pinned, bytes
reserved in the tier and under the tenant's quota, slots pinned while they are read), runs its
tier I/O outside it, and commits under it, checking again what may have changed meanwhile. So a
slow disk write, a demotion or a Redis round trip never delays a lookup, nor a get served by
another tier. What a race can cost is a miss (a block read while it was being evicted is looked
for in the next tier), never wrong KV nor a tier above its capacity. The write-through tiers of a
put are written on per-tier executors while tier 0 is written, and ``put_async`` / ``get_async``
return futures for callers that overlap transfers with compute.

A tier's policy is a ``BlockPolicy`` (``kvtier.kvstore.policy``, the contract kvstore owns) or the
name of a built-in one (``"lru"``, ``"s3fifo"``, ...). The built-ins live in ``kvtier.eviction.blocks``,
which imports kvstore; a name is therefore resolved at run time by importing that package (the one
place kvstore reaches above itself, and only when given a name): pass an instance to avoid it.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .bookkeeping import Event, EventLog, Lease, LeaseTable, TenantLedger, WriteThroughQueue
from .index import NO_PARENT, PrefixIndex
from .keys import BlockHash, Namespace, chain_hashes, check_keys
from .membership import MembershipRefresher
from .policy import BlockPolicy
from .spec import KVSpec
from .tiers.base import StorageTier
from kvtier.threads import check_io_priority, lower_thread_priority

log = logging.getLogger(__name__)

__all__ = ["Event", "Lease", "LookupResult", "TierConfig", "TieredStore"]

# Frame header and msgpack framing on top of a block's payload, reserved when making room.
_FRAME_SLACK = 1024
# Demotions read their victims from the tier in groups of at most this many bytes (bounded memory).
_DEMOTE_GROUP_BYTES = 64 << 20


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
            raise ValueError(f"watermarks must satisfy 0 < low <= high <= 1, got low={self.low_watermark}, high={self.high_watermark}")


@dataclass(frozen=True)
class LookupResult:
    num_blocks: int  # longest cached prefix of the chain, in blocks, over all tiers
    tier_prefix: dict[str, int]  # longest prefix held by each tier on its own
    tier_hits: dict[str, int]  # of the first num_blocks, how many each tier would serve (the fastest holder)

    @property
    def num_tokens_for(self) -> Callable[[int], int]:
        return lambda block_tokens: self.num_blocks * block_tokens


@dataclass
class _Tier:
    cfg: TierConfig
    policy: BlockPolicy
    write_through: WriteThroughQueue | None = None  # write-through tiers only: the keys it refused
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    reserved: int = 0  # bytes that writes in flight will add (planned under the lock)
    freeing: int = 0  # bytes that evictions in flight will remove (victims chosen, not yet gone)
    executor: ThreadPoolExecutor | None = None  # write-throughs into this tier run here
    demotion_failures: int = 0  # victims no lower tier took (disk full, Redis down): kept here instead of dropped

    @property
    def tier(self) -> StorageTier:
        return self.cfg.tier


_UNTRACKED = object()  # first_tier_entry's token when the first tier lends no buffers


@dataclass
class _Item:
    slot: int
    key: bytes
    block: torch.Tensor
    spec: KVSpec
    gen: int = -1  # a copy (moving): the entry's generation when its bytes were read (-1: a put's own block)


@dataclass
class _Victim:
    slot: int
    key: bytes
    spec: KVSpec
    nbytes: int  # what it is expected to free (its size estimate in the tier)


def _by_spec(entries) -> dict[KVSpec, list]:
    out: dict[KVSpec, list] = {}
    for e in entries:
        out.setdefault(e.spec, []).append(e)
    return out


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
        io_workers: int = 4,
        shared_lookup_wait_s: float = 0.005,
        io_nice: int = 0,
        io_priority: str = "low",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_write_through_pending``: refused write-throughs remembered per tier (the oldest are
        forgotten beyond it; they still reach the tier when evicted from above); at most
        ``write_through_retry_batch`` of them are tried again per ``put``. ``io_workers``: threads
        per write-through tier, and for ``put_async`` / ``get_async``. ``shared_lookup_wait_s``: the
        longest a lookup waits for a shared tier (Redis) to say which blocks it holds; past it the
        lookup answers from what this process last saw there (see ``lookup``); 0: never wait.
        ``io_nice`` / ``io_priority``: the write-through threads run ``io_nice`` lower in CPU priority
        (0-19; a put waits for its write-throughs, so this slows puts on a busy machine) and at this
        I/O priority (``"low"``: best-effort level 7, ``"idle"``, ``"normal"``: see ``kvtier.threads``)."""
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        cfgs = [t if isinstance(t, TierConfig) else TierConfig(t) for t in tiers]
        names = [c.tier.name for c in cfgs]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        for name, v in (("max_write_through_pending", max_write_through_pending), ("write_through_retry_batch", write_through_retry_batch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if isinstance(io_workers, bool) or not isinstance(io_workers, int) or io_workers < 1:
            raise ValueError(f"io_workers must be a positive int, got {io_workers!r}")
        if isinstance(io_nice, bool) or not isinstance(io_nice, int) or not 0 <= io_nice <= 19:
            raise ValueError(f"io_nice must be an int from 0 to 19, got {io_nice!r}")
        self.io_nice, self.io_priority = io_nice, check_io_priority(io_priority)
        if (
            isinstance(shared_lookup_wait_s, bool)
            or not isinstance(shared_lookup_wait_s, (int, float))
            or not 0 <= shared_lookup_wait_s < float("inf")
        ):
            raise ValueError(f"shared_lookup_wait_s must be a non-negative number of seconds, got {shared_lookup_wait_s!r}")
        self.shared_lookup_wait_s = float(shared_lookup_wait_s)
        self._ledger = TenantLedger(quotas)
        self._tiers = [
            _Tier(c, _resolve_policy(c.policy), WriteThroughQueue(max_write_through_pending) if c.write_through else None) for c in cfgs
        ]
        self._index = PrefixIndex(len(cfgs))
        # fixed with the tiers; a lookup reads them on every call
        self._names = tuple(t.tier.name for t in self._tiers)
        self._shared = tuple(t for t, st in enumerate(self._tiers) if st.tier.capabilities.shared)
        self._local_bits = sum(1 << t for t in range(len(self._tiers)) if t not in self._shared)
        self.max_write_through_pending = max_write_through_pending
        self.write_through_retry_batch = write_through_retry_batch
        self.promote_on_hit = promote_on_hit
        self.max_pin_ttl_s = max_pin_ttl_s
        self.io_workers = io_workers
        self._lock = threading.RLock()  # bookkeeping only: never held across a tier call
        # keys with a copy in flight (demotion, promotion, write-through retry, flush): a put of such a
        # key after it was deleted waits for none, it is refused, so old bytes never land under the new block
        self._copying: dict[bytes, int] = {}
        self._specs: list[KVSpec] = []
        self._spec_ids: dict[KVSpec, int] = {}
        self._tenants: list[str] = []
        self._tenant_ids: dict[str, int] = {}
        self._events = EventLog(max_events)
        self._leases = LeaseTable(clock)
        self._async: ThreadPoolExecutor | None = None
        # shared tiers: their membership asked on a thread of their own, so a lookup bounds its wait
        self._membership = {t: MembershipRefresher(c.tier) for t, c in enumerate(cfgs) if c.tier.capabilities.shared}
        self._closed = False
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
    def lookup_waits_on_io(self) -> bool:
        """Whether a lookup may wait (at most ``shared_lookup_wait_s``) for a shared tier's answer;
        False: a lookup is bookkeeping only (no shared tier, or ``shared_lookup_wait_s`` = 0)."""
        return bool(self._membership) and self.shared_lookup_wait_s > 0

    @property
    def index(self) -> PrefixIndex:
        return self._index

    @property
    def quota_evictions(self) -> int:
        return self._ledger.evictions

    @property
    def quota_refusals(self) -> int:
        return self._ledger.refusals

    def register_spec(self, spec: KVSpec) -> None:
        """Make a spec known, and adopt blocks of it found in persistent tiers (e.g. disk after a restart)."""
        with self._lock:
            self._spec_id(spec)
            self._adopt_persistent(spec)

    def _adopt_persistent(self, spec: KVSpec | None = None) -> None:
        """Index blocks that persistent, non-shared tiers already hold (found again after a restart).
        Reads only the tiers' own in-memory listings (no I/O)."""
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
    def events(self, after: int = 0, limit: int = 1000) -> list[Event]:
        """Events with id > ``after``, oldest first, at most ``limit`` (the stream keeps the last ``max_events``)."""
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        return self._events.since(after, limit)

    @property
    def last_event_id(self) -> int:
        return self._events.last_id

    # -- residency bookkeeping (under the lock) --------------------------------------------
    def _mark_stored(self, t: int, slot: int, key: bytes, spec: KVSpec, *, nbytes: int, depth: int, tenant: str) -> None:
        idx = self._index
        if idx.residency(slot) == 0:
            self._ledger.charge(tenant, spec.block_nbytes)
        idx.set_resident(slot, t, True)
        self._tiers[t].policy.on_insert(key, nbytes, depth=depth, tenant=tenant)
        self._events.emit("stored", key, self._tiers[t].tier.name, spec.short_fingerprint)

    def _mark_removed(self, t: int, slot: int, key: bytes, spec: KVSpec) -> None:
        idx = self._index
        tenant = self._tenants[idx.tenant_id(slot)]
        self._tiers[t].policy.on_remove(key)
        idx.set_resident(slot, t, False)  # may drop the entry (and ghost ancestors) from the index
        if idx.slot(key) is None or idx.residency(idx.slot(key)) == 0:
            self._ledger.credit(tenant, spec.block_nbytes)
        self._events.emit("removed", key, self._tiers[t].tier.name, spec.short_fingerprint)

    def _unmark_everywhere(self, slot: int, key: bytes) -> list[tuple[int, bytes, KVSpec]]:
        """Forget a block in every tier; returns the (tier, key, spec) removals to run outside the lock."""
        spec = self._specs[self._index.spec_id(slot)]
        out = []
        for t in range(len(self._tiers)):
            if self._index.slot(key) != slot:
                break
            if self._index.residency(slot) & (1 << t):
                self._mark_removed(t, slot, key, spec)
                out.append((t, key, spec))
        return out

    def _remove_from_tiers(self, removals: list[tuple[int, bytes, KVSpec]]) -> None:
        """Tier I/O (no lock): delete what ``_unmark_everywhere`` forgot."""
        for (t, spec), group in _group_removals(removals).items():
            self._tiers[t].tier.remove(group, spec=spec)

    def _unpin_live(self, pinned: Sequence[tuple[int, bytes]]) -> None:
        idx = self._index
        for slot, key in pinned:
            if idx.slot(key) == slot:
                idx.unpin(slot)

    def _copy_begin(self, keys) -> None:  # under the lock
        for key in keys:
            self._copying[key] = self._copying.get(key, 0) + 1

    def _copy_end(self, keys) -> None:  # under the lock
        for key in keys:
            n = self._copying.get(key, 0) - 1
            if n > 0:
                self._copying[key] = n
            else:
                self._copying.pop(key, None)

    def _expire_leases(self) -> None:
        for slots in self._leases.expired():
            for slot in slots:
                self._index.unpin(slot)

    # -- writing (called without the lock) -------------------------------------------------
    def _need(self, t: int, spec: KVSpec) -> int:
        tier = self._tiers[t].tier
        return spec.block_nbytes + (_FRAME_SLACK if tier.capabilities.framed else 0)

    def _store_into(self, t: int, items: list[_Item], *, cascade: bool = True, chain_order: bool = True, moving: bool = False) -> None:
        """Store ``items`` in tier t (making room); what t refuses goes on to t+1 when ``cascade``.

        The items' slots are pinned by the caller. ``chain_order``: items are a chain (root first),
        inserted into the policy deepest first so that recency ages the chain's tail first;
        otherwise in the order given (demoted victims keep their relative age). ``moving``: copies
        of blocks cached elsewhere (demotion, promotion, write-through retry): one removed from
        every tier while it was copied is not brought back (what was written is deleted again).
        """
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
            groups = _by_spec(chunk)
            with self._lock:
                st.reserved += need
                # a block with no known parent is a sequence's first: codecs that keep its sinks exact do so
                firsts = {spec: [self._index.depth(it.slot) == 0 for it in g] for spec, g in groups.items()}
            left = need
            try:
                for spec, group in groups.items():
                    sizes = tier.put([it.key for it in group], [it.block for it in group], spec=spec, first=firsts[spec])
                    orphans = []
                    with self._lock:
                        done = sum(self._need(t, spec) for _ in group)
                        st.reserved -= done  # the tier counts these bytes itself now
                        left -= done
                        stored = []
                        for it, size in zip(group, sizes):
                            if size > 0:
                                stored.append((it, size))
                            else:
                                refused.append(it)
                        idx = self._index
                        for it, size in reversed(stored) if chain_order else stored:
                            if idx.slot(it.key) != it.slot or (moving and idx.residency(it.slot) == 0):
                                orphans.append(it.key)  # removed everywhere while it was copied
                                continue
                            if moving and it.gen >= 0 and idx.generation(it.slot) != it.gen:
                                # removed and written again while the old bytes were copied: what tier t holds
                                # under this key may be the old bytes, so it holds nothing of the new block
                                if idx.residency(it.slot) & (1 << t):
                                    self._mark_removed(t, it.slot, it.key, spec)
                                orphans.append(it.key)
                                continue
                            if not idx.residency(it.slot) & (1 << t):
                                self._mark_stored(
                                    t,
                                    it.slot,
                                    it.key,
                                    spec,
                                    nbytes=size,
                                    depth=idx.depth(it.slot),
                                    tenant=self._tenants[idx.tenant_id(it.slot)],
                                )
                    if orphans:
                        tier.remove(orphans, spec=spec)
            finally:
                with self._lock:
                    st.reserved -= left
        if refused and cascade and t + 1 < len(self._tiers):
            self._store_into(t + 1, refused, chain_order=chain_order, moving=moving)

    def _make_room(self, t: int, need: int, protect: set[int] = frozenset()) -> None:
        """Evict from tier t until ``need`` more bytes fit under the low watermark (hysteresis).

        Victims are chosen (and pinned) under the lock, evicted outside it; the loop looks again
        after each round, since sizes are estimates and other writers run meanwhile."""
        st = self._tiers[t]
        tier = st.tier
        cap = tier.capacity_bytes
        if cap is None:
            return
        # after the write the tier sits at its low watermark (hysteresis: the next writes need no eviction)
        target = max(0, int(cap * st.cfg.low_watermark) - need)
        skip = set(protect)  # protected, plus victims whose demotion failed (they stay)
        first = True
        while True:
            with self._lock:
                projected = tier.used_bytes + st.reserved - st.freeing
                if first and projected + need <= cap * st.cfg.high_watermark:
                    return
                first = False
                if projected <= target:
                    return
                victims = self._choose_victims(t, projected - target, skip)
            if not victims:
                return  # the whole order was seen and nothing is evictable: the put is refused here
            skip |= self._evict(t, victims)

    def _choose_victims(self, t: int, nbytes: int, protect: set[int]) -> list[_Victim]:
        """Under the lock: evictable blocks of tier t, in policy order, worth about ``nbytes``; pinned."""
        st, idx = self._tiers[t], self._index
        victims: list[_Victim] = []
        freed = 0
        n = 16
        while freed < nbytes:
            cands = st.policy.candidates(n)
            for key in cands:
                slot = idx.slot(key)
                if slot is None or slot in protect or not idx.is_evictable(slot, t):
                    continue  # chosen ones are pinned, so never twice
                spec = self._specs[idx.spec_id(slot)]
                v = _Victim(slot, key, spec, self._need(t, spec))
                idx.pin(slot)
                victims.append(v)
                freed += v.nbytes
                if freed >= nbytes:
                    break
            if freed >= nbytes or len(cands) < n:
                break  # enough, or the whole order was seen (a parent becomes a leaf once its child is gone)
            n *= 2  # the head of the order is pinned or has resident children: look further
        st.freeing += freed
        return victims

    def _evict(self, t: int, victims: list[_Victim]) -> set[int]:
        """Tier I/O (no lock): demote the victims to t+1 (unless it holds them), remove them from t, commit.

        A victim that no lower tier took (disk full, Redis down) and that no other tier holds stays
        in t and is counted in ``demotion_failures``: eviction never drops a block silently (only the
        last tier's evictions end a block's life). Returns the slots that stayed."""
        st = self._tiers[t]
        tier = st.tier
        nxt = t + 1 if t + 1 < len(self._tiers) else None
        left = sum(v.nbytes for v in victims)
        stayed: set[int] = set()
        try:
            for group in _byte_groups(victims, _DEMOTE_GROUP_BYTES):
                with self._lock:
                    idx = self._index
                    live = [v for v in group if idx.slot(v.key) == v.slot and idx.residency(v.slot) & (1 << t)]
                    demote = [v for v in live if nxt is not None and not idx.residency(v.slot) & (1 << nxt)]
                    gens = {v.slot: idx.generation(v.slot) for v in demote}
                    self._copy_begin(v.key for v in demote)
                if demote:
                    items = []
                    try:
                        for spec, vs in _by_spec(demote).items():
                            got = tier.get([v.key for v in vs], spec=spec)
                            items += [_Item(v.slot, v.key, b, spec, gens[v.slot]) for v, b in zip(vs, got) if b is not None]
                        self._store_into(nxt, items, chain_order=False, moving=True)
                    finally:
                        with self._lock:
                            self._copy_end(v.key for v in demote)
                    with self._lock:
                        idx = self._index
                        st.demotions += sum(1 for it in items if idx.slot(it.key) == it.slot and idx.residency(it.slot) & (1 << nxt))
                        kept = {it.slot for it in items if idx.slot(it.key) == it.slot and not idx.residency(it.slot) & ~(1 << t)}
                        st.demotion_failures += len(kept)
                        stayed |= kept
                    live = [v for v in live if v.slot not in kept]
                for spec, vs in _by_spec(live).items():
                    tier.remove([v.key for v in vs], spec=spec)
                with self._lock:
                    idx = self._index
                    for v in live:
                        if idx.slot(v.key) == v.slot and idx.residency(v.slot) & (1 << t):
                            self._mark_removed(t, v.slot, v.key, v.spec)
                    st.evictions += len(live)
                    freed = sum(v.nbytes for v in group)
                    st.freeing -= freed  # the tier's own count has dropped now
                    left -= freed
        finally:
            with self._lock:
                st.freeing -= left
                self._unpin_live([(v.slot, v.key) for v in victims])
        return stayed

    # -- write-through retries ---------------------------------------------------------------
    def _remember_refused(self, t: int, items: list[_Item]) -> None:
        """Under the lock: note the items tier t (write-through) did not take but a faster tier holds."""
        st, idx = self._tiers[t], self._index
        for it in items:
            slot = idx.slot(it.key)
            if slot != it.slot or not idx.residency(slot) or idx.residency(slot) & (1 << t):
                continue
            st.write_through.remember(it.key)

    def _retry_pending(self, t: int, limit: int | None) -> int:
        """Write up to ``limit`` pending blocks into tier t, oldest first, each read from the fastest
        tier holding it; stops at the first refusal (the tier is down or full). Returns how many landed."""
        st = self._tiers[t]
        if not getattr(st.tier, "available", True):
            return 0
        landed = tried = 0
        while limit is None or tried < limit:
            with self._lock:
                idx = self._index
                key = st.write_through.claim()
                if key is None:
                    break
                slot = idx.slot(key)
                res = idx.residency(slot) if slot is not None else 0
                if not res or res & (1 << t):  # gone everywhere, or already there (demoted meanwhile)
                    continue
                spec = self._specs[idx.spec_id(slot)]
                src = (res & -res).bit_length() - 1  # the fastest tier holding it
                idx.pin(slot)
                gen = idx.generation(slot)
                self._copy_begin([key])
            try:
                block = self._tiers[src].tier.get([key], spec=spec)[0]
                tried += 1
                if block is not None:  # None: that tier lost it (e.g. a corrupt frame): nothing to copy from
                    self._store_into(t, [_Item(slot, key, block, spec, gen)], cascade=False, moving=True)
            finally:
                with self._lock:
                    self._unpin_live([(slot, key)])
                    self._copy_end([key])
            if block is None:
                continue
            with self._lock:
                s2 = self._index.slot(key)
                if s2 is None or not self._index.residency(s2) & (1 << t):
                    st.write_through.requeue(key)
                    break  # refused again: keep it, try later
                st.write_through.retried += 1
            landed += 1
        return landed

    def write_through_pending(self) -> int:
        """Blocks write-through tiers refused and that wait for another try (all such tiers)."""
        with self._lock:
            return sum(len(st.write_through) for st in self._tiers if st.write_through is not None)

    def retry_write_through(self, limit: int | None = None) -> int:
        """Try now to write the blocks that write-through tiers refused (all of them, or ``limit``
        per tier). Returns how many landed; ``stats()`` shows what is still pending."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
        return sum(self._retry_pending(t, limit) for t, st in enumerate(self._tiers) if t > 0 and st.cfg.write_through)

    def _quota_room(self, tenant: str, tid: int, nbytes: int, removals: list) -> bool:
        """Under the lock: make room under ``tenant``'s quota by forgetting its own oldest leaves
        (their tier removals are appended to ``removals``); False if impossible."""
        over = self._ledger.over_quota(tenant, nbytes)
        if over < 0:
            return False
        while over > 0:
            leaves = self._index.tenant_leaves_oldest_first(tid)
            if not leaves:
                return False
            for slot in leaves:
                if self._ledger.over_quota(tenant, nbytes) <= 0:
                    break
                removals += self._unmark_everywhere(slot, self._index.key(slot))
                self._ledger.evictions += 1
            over = self._ledger.over_quota(tenant, nbytes)
        return True

    def _executor(self, t: int) -> ThreadPoolExecutor:
        st = self._tiers[t]
        if st.executor is None:
            with self._lock:
                if st.executor is None:
                    st.executor = ThreadPoolExecutor(
                        self.io_workers,
                        thread_name_prefix=f"kvtier-{st.tier.name}",
                        initializer=lower_thread_priority,
                        initargs=(self.io_nice, f"{st.tier.name} write-through threads", self.io_priority),
                    )
        return st.executor

    # -- public API ------------------------------------------------------------------------
    def _check_put(self, spec: KVSpec, keys, blocks) -> tuple[list[bytes], list[torch.Tensor]]:
        keys = check_keys(keys)
        if isinstance(blocks, torch.Tensor):
            if blocks.dim() != len(spec.block_shape) + 1:
                raise ValueError(
                    f"a stacked batch of blocks must be [N, {', '.join(map(str, spec.block_shape))}], got {list(blocks.shape)}"
                )
            blocks = list(blocks.unbind(0))
        if len(blocks) != len(keys):
            raise ValueError(f"put needs one block per key: got {len(keys)} keys and {len(blocks)} blocks")
        for b in blocks:
            spec.check_block(b)
        return keys, list(blocks)

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
        keys, blocks = self._check_put(spec, keys, blocks)
        return self._put(spec, keys, blocks, tenant, parent)

    # -- leased buffers: a block written straight into the memory the first tier keeps ---------------
    def _lessor(self):
        """The first tier when it lends its own buffers (a HostTier with the identity codec), else None."""
        tier = self._tiers[0].tier if self._tiers else None
        if tier is not None and hasattr(tier, "lease") and tier.codec.name == "identity":
            return tier
        return None

    @property
    def lends_buffers(self) -> bool:
        """True when the first tier is a host tier that lends its buffers (``lease_buffer``)."""
        return self._lessor() is not None

    def lease_buffer(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 CPU buffer of ``nbytes`` to write one block into before putting it. When the first
        tier is a host tier it lends one of its own buffers (``HostTier.lease``), and a ``put`` of a block
        viewing it whole stores that buffer instead of a copy; else a new buffer. The caller must not
        write it once put, and calls ``release_buffer`` afterwards in every case."""
        tier = self._lessor()
        return tier.lease(nbytes) if tier is not None else torch.empty(nbytes, dtype=torch.uint8)

    def release_buffer(self, buf: torch.Tensor) -> None:
        """Hand back a ``lease_buffer`` buffer (one the first tier did not adopt is left to be freed with
        its last reference: whoever still holds it may read it)."""
        tier = self._lessor()
        if tier is not None:
            tier.unlease(buf, recycle=False)

    def first_tier_entry(self, key: bytes, own: torch.Tensor) -> tuple[object, torch.Tensor | None]:
        """(token, block to read) for work that reads a put's block after the put (page summaries). When the
        first tier lends buffers: its stored block itself (never to be written), or None when it holds no
        such key; ``first_tier_holds(key, token)`` is then False once that entry was removed (its buffer
        possibly reused for another block), and what was read is to be dropped. Otherwise: ``own`` (the
        caller's buffer, which no tier reuses) and a token ``first_tier_holds`` always accepts."""
        tier = self._lessor()
        if tier is None:
            return _UNTRACKED, own
        token = tier.entry_token(key)
        return token, tier.entry_block(token)

    def first_tier_holds(self, key: bytes, token: object) -> bool:
        if token is _UNTRACKED:
            return True  # no tier lent the buffer: the caller's own
        tier = self._lessor()
        return tier is not None and tier.holds(key, token)

    def put_async(self, spec: KVSpec, keys: Sequence[bytes], blocks, *, tenant: str = "", parent: bytes | None = None) -> Future:
        """``put`` on the store's I/O threads: a future of its result. Invalid input raises here, at once.
        The blocks must not change until the future is done."""
        keys, blocks = self._check_put(spec, keys, blocks)
        return self._submit(self._put, spec, keys, blocks, tenant, parent)

    def _put(self, spec: KVSpec, keys: list[bytes], blocks: list[torch.Tensor], tenant: str, parent) -> list[bool]:
        idx = self._index
        nbytes = spec.block_nbytes
        removals: list[tuple[int, bytes, KVSpec]] = []
        new_items: list[tuple[int, _Item]] = []
        result = [False] * len(keys)
        with self._lock:  # plan: admit under the quota, reserve, pin
            self._expire_leases()
            sid = self._spec_id(spec)
            tid = self._tenant_id(tenant)
            parent_slot = idx.slot(bytes(parent)) if parent is not None else None
            depth = idx.depth(parent_slot) + 1 if parent_slot is not None else 0
            parent_slot = NO_PARENT if parent_slot is None else parent_slot
            for i, key in enumerate(keys):
                slot = idx.slot(key)
                if slot is not None and idx.residency(slot):
                    result[i] = True
                    parent_slot, depth = slot, idx.depth(slot) + 1
                    continue
                if key in self._copying:  # deleted while a copy of its old bytes is in flight: not now
                    self._ledger.refusals += len(keys) - i
                    break
                if not self._quota_room(tenant, tid, nbytes, removals):
                    self._ledger.refusals += len(keys) - i
                    break
                slot = idx.add(key, parent_slot, depth=depth, spec_id=sid, tenant_id=tid)
                self._ledger.reserve(tenant, nbytes)  # later blocks (and other puts) see them against the quota
                idx.pin(slot)  # held while the batch is written, so no eviction can drop it
                new_items.append((i, _Item(slot, key, blocks[i], spec)))
                parent_slot, depth = slot, depth + 1
        items = [it for _, it in new_items]
        try:
            self._remove_from_tiers(removals)  # quota evictions first: their room is ours
            for t, st in enumerate(self._tiers):  # earlier refusals first, while the tier is up
                if t > 0 and st.write_through is not None and len(st.write_through):
                    self._retry_pending(t, self.write_through_retry_batch)
            through = [
                (t, self._executor(t).submit(self._store_into, t, items, cascade=False))
                for t, st in enumerate(self._tiers)
                if t > 0 and st.cfg.write_through and items
            ]
            try:
                self._store_into(0, items)
            finally:
                for t, fut in through:
                    try:
                        fut.result()
                    except Exception:  # a tier failing must not lose what tier 0 took: remembered below
                        log.exception("write-through to tier %s failed", self._tiers[t].tier.name)
            with self._lock:
                for t, _ in through:
                    self._remember_refused(t, items)
        finally:
            with self._lock:
                self._ledger.release(tenant, nbytes * len(items))
                self._unpin_live([(it.slot, it.key) for it in items])
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
        keys = self._check_get(spec, keys, out)
        return self._get(spec, keys, out)

    def get_async(self, spec: KVSpec, keys: Sequence[bytes], out: Sequence[torch.Tensor] | None = None) -> Future:
        """``get`` on the store's I/O threads: a future of its result. Invalid input raises here, at once."""
        keys = self._check_get(spec, keys, out)
        return self._submit(self._get, spec, keys, out)

    @staticmethod
    def _check_get(spec: KVSpec, keys, out) -> list[bytes]:
        keys = check_keys(keys)
        if out is not None:
            if len(out) != len(keys):
                raise ValueError(f"get needs one out buffer per key: got {len(keys)} keys and {len(out)} buffers")
            for o in out:
                spec.check_block(o)
        return keys

    def _get(self, spec: KVSpec, keys: list[bytes], out) -> list[torch.Tensor | None]:
        idx = self._index
        with self._lock:
            self._expire_leases()
            sid = self._spec_id(spec)
        result: list[torch.Tensor | None] = [None] * len(keys)
        remaining = list(range(len(keys)))
        found_in: dict[int, int] = {}  # i -> the tier that served it (-1: removed while it was read)
        gens: dict[int, int] = {}  # i -> its entry's generation when it was read
        for t, st in enumerate(self._tiers):
            if not remaining:
                break
            shared = st.tier.capabilities.shared
            with self._lock:  # plan: which keys this tier serves; pinned so that no eviction picks them meanwhile
                ask, pinned = [], []
                for i in remaining:
                    slot = idx.slot(keys[i])
                    if slot is not None and idx.residency(slot) & (1 << t):
                        ask.append(i)
                        idx.pin(slot)
                        pinned.append((slot, keys[i]))
                    elif shared and (slot is None or idx.residency(slot) == 0):
                        ask.append(i)  # another instance may have written it
            if not ask:
                continue
            try:
                got = st.tier.get([keys[i] for i in ask], spec=spec, out=[out[i] for i in ask] if out is not None else None)
            except BaseException:
                with self._lock:
                    self._unpin_live(pinned)
                raise
            vanished = [i for i, block in zip(ask, got) if block is None]
            # a private tier's own listing says whether a miss is really gone (it may have been evicted and
            # written again meanwhile); a shared tier's answer is taken as it is
            still_there = st.tier.contains([keys[i] for i in vanished], spec=spec) if vanished and not shared else [False] * len(vanished)
            gone = {i for i, there in zip(vanished, still_there) if not there}
            with self._lock:  # commit
                hit = set()
                for i, block in zip(ask, got):
                    slot = idx.slot(keys[i])
                    if block is None:
                        if i in gone and slot is not None and idx.residency(slot) & (1 << t):
                            # it vanished (corrupt, expired, Redis down, evicted meanwhile): forget it here, try below
                            self._mark_removed(t, slot, keys[i], spec)
                        continue
                    result[i] = block
                    if slot is None or not idx.residency(slot) & (1 << t):
                        if not shared:  # removed while it was read: the answer stands, the copy is not indexed again
                            found_in[i] = -1
                            continue
                        parent = idx.slot(keys[i - 1]) if i > 0 else None
                        slot = idx.add(keys[i], parent if parent is not None else NO_PARENT, spec_id=sid, tenant_id=self._tenant_id(""))
                        self._mark_stored(t, slot, keys[i], spec, nbytes=spec.block_nbytes, depth=0, tenant="")
                    found_in[i] = t
                    gens[i] = idx.generation(slot)
                    hit.add(i)
                for i in reversed(ask):
                    if i in hit:
                        st.policy.on_access(keys[i])
                        idx.touch(idx.slot(keys[i]))
                self._unpin_live(pinned)
            remaining = [i for i in remaining if i not in hit and found_in.get(i) != -1]
        if self.promote_on_hit and any(t > 0 for t in found_in.values()):
            with self._lock:
                items = []
                for i in sorted(i for i, t in found_in.items() if t > 0):
                    slot = idx.slot(keys[i])
                    if slot is not None and idx.generation(slot) == gens[i]:  # not deleted (and rewritten) since the read
                        items.append((found_in[i], _Item(slot, keys[i], result[i], spec, gens[i])))
                        idx.pin(slot)
                self._copy_begin(it.key for _, it in items)
            try:
                self._store_into(0, [it for _, it in items], cascade=False, moving=True)
            finally:
                with self._lock:
                    self._copy_end(it.key for _, it in items)
                    self._unpin_live([(it.slot, it.key) for _, it in items])
                    for t, it in items:
                        if idx.slot(it.key) == it.slot and idx.residency(it.slot) & 1:
                            self._tiers[t].promotions += 1
        return result

    def lookup(self, spec: KVSpec, keys: Sequence[bytes], *, wait: bool = True) -> LookupResult | None:
        """Longest cached prefix of a chain, overall and per tier, in one call.

        Tiers private to this process answer from the index (under the lock, which covers
        bookkeeping only: a lookup never waits for a tier's I/O). A shared tier (Redis) is written
        and emptied by other instances too: it is asked (one pipelined round trip, on a thread of
        its own that coalesces concurrent lookups), and the lookup waits for its answer at most
        ``shared_lookup_wait_s``. Past that, or while the tier is down, the lookup answers from
        what this process last saw there (its own writes, reads and deletes, earlier answers, and
        other instances' announcements: ``RedisTier.contains_cached``), which may be stale in both
        directions: a block only another instance wrote may be missing from the answer until the
        pending check (or its announcement) arrives, and a block another instance deleted may be
        reported until then. A ``get`` asks the shared tier itself and verifies every frame, so a
        stale lookup costs a miss or a smaller prefix, never wrong KV.

        ``wait=False``: None instead of waiting for the lock, and no wait for a shared tier (a
        caller on an event loop then hops to a thread).
        """
        keys = check_keys(keys)
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            if self._leases:
                self._expire_leases()
            masks_l = self._index.residency_list(keys)  # plain ints: a chain is short, numpy calls cost more than they save
        finally:
            self._lock.release()
        n = len(keys)
        names, shared, local_bits = self._names, self._shared, self._local_bits
        tier_prefix: dict[str, int] = {}
        for t, name in enumerate(names):
            if t in shared:
                tier_prefix[name] = self._shared_prefix(t, spec, keys, masks_l, self.shared_lookup_wait_s if wait else 0.0) if n else 0
            else:
                bit = 1 << t
                tier_prefix[name] = next((i for i, m in enumerate(masks_l) if not m & bit), n)
        holder = [-1] * n  # the fastest tier that would serve each block
        for i, mask in enumerate(masks_l):
            mask &= local_bits
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

    def _shared_prefix(self, t: int, spec: KVSpec, keys: list[bytes], masks: list[int], bound: float) -> int:
        """How many leading keys shared tier t holds: its answer if it comes within ``bound`` seconds,
        else what this process last saw there (the index for keys it has seen nothing of)."""
        tier = self._tiers[t].tier
        if not getattr(tier, "available", True):
            return 0  # down (its circuit is open): it would serve nothing now
        refresher = self._membership[t]
        fut = refresher.ask(spec, keys)  # answered or not in time, the answer refreshes what is known
        if fut is not None and bound > 0 and refresher.stalled_for() < bound:  # a stalled round: no answer in time
            try:
                got = fut.result(timeout=bound)
            except FutureTimeout:
                got = None
            if got is not None:
                return next((i for i, present in enumerate(got) if not present), len(keys))
        if getattr(tier, "failing", False):
            return 0  # its last call failed and no answer came since: it would most likely serve nothing
        cached = getattr(tier, "contains_cached", None)
        known = cached(keys, spec=spec) if cached is not None else [None] * len(keys)
        bit = 1 << t
        for i, (seen, mask) in enumerate(zip(known, masks)):
            if not (seen if seen is not None else mask & bit):
                return i
        return len(keys)

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
        removals: list[tuple[int, bytes, KVSpec]] = []
        unknown: list[bytes] = []
        unseen_in_shared: list[bytes] = []  # cached here, not known to be in a shared tier: it may be there
        shared = [t for t, st in enumerate(self._tiers) if st.tier.capabilities.shared]
        with self._lock:
            for key in keys:
                slot = self._index.slot(key)
                if slot is not None and self._index.residency(slot):
                    had = self._index.residency(slot)
                    removals += self._unmark_everywhere(slot, key)
                    n += 1
                    if any(not had & (1 << t) for t in shared):
                        unseen_in_shared.append(key)  # e.g. written by this instance before a restart
                else:
                    unknown.append(key)
        self._remove_from_tiers(removals)
        for key in unknown:  # another instance may have written it to a shared tier
            for st in self._tiers:
                if st.tier.capabilities.shared:
                    n += bool(st.tier.remove([key], spec=spec))
        if unseen_in_shared:
            for t in shared:
                self._tiers[t].tier.remove(unseen_in_shared, spec=spec)
        return n

    # -- page reads (paged codecs): planned under the lock, read outside it ------------------
    def _range_tiers(self, keys: Sequence[bytes]) -> list[list[int]]:
        """Per key, the range-reading tiers that may hold it, fastest first (under the lock)."""
        idx = self._index
        out = []
        for key in keys:
            slot = idx.slot(key)
            mask = idx.residency(slot) if slot is not None else 0
            cand = [t for t, st in enumerate(self._tiers) if st.tier.capabilities.range_reads and mask & (1 << t)]
            cand += [
                t for t, st in enumerate(self._tiers) if st.tier.capabilities.range_reads and st.tier.capabilities.shared and t not in cand
            ]
            out.append(cand)
        return out

    def _rounds(self, keys: Sequence[bytes], ask: Callable[[int, list[int]], list[bool]]) -> None:
        """Ask each key's candidate tiers in order, batched per tier: ``ask(t, positions)`` says per
        position whether tier t answered (the others go on to their next candidate)."""
        with self._lock:
            cands = self._range_tiers(keys)
        pos = [0] * len(keys)
        pending = [i for i in range(len(keys)) if cands[i]]
        while pending:
            by_tier: dict[int, list[int]] = {}
            for i in pending:
                by_tier.setdefault(cands[i][pos[i]], []).append(i)
            pending = []
            for t, batch in by_tier.items():
                for i, ok in zip(batch, ask(t, batch)):
                    if not ok:
                        pos[i] += 1
                        if pos[i] < len(cands[i]):
                            pending.append(i)

    def page_layouts(self, spec: KVSpec, keys: Sequence[bytes]) -> list:
        """Per key, the ``kvstore.pages.PageLayout`` of the block in the fastest tier that serves
        ranges of it (``None``: not cached in such a tier, or not stored with a paged codec)."""
        keys = check_keys(keys)
        out: list = [None] * len(keys)

        def ask(t: int, batch: list[int]) -> list[bool]:
            got = self._tiers[t].tier.page_layouts([keys[i] for i in batch], spec=spec)
            for i, layout in zip(batch, got):
                out[i] = layout
            return [layout is not None for layout in got]

        self._rounds(keys, ask)
        return out

    def read_pieces(self, spec: KVSpec, requests: Sequence[tuple[Any, Sequence[Any]]]):
        """Read pieces (``kvstore.pages.Pages`` / ``Summary``) of paged blocks without reading the blocks.

        ``requests``: ``(layout, pieces)`` per block, the layout from ``page_layouts``. Each block
        is read from the fastest tier holding it that serves ranges, the next one if that fails;
        every piece is verified against the layout's checksums. The store's lock is held only to
        plan (which tier holds what) and to note the access; the reads run outside it. Blocks
        read this way are not promoted (a few pages do not pull a whole block up).
        Returns a ``kvstore.pages.PieceReads``.
        """
        from .pages import PieceReads

        layouts = [r[0] for r in requests]
        keys = check_keys([lay.key for lay in layouts])
        for lay in layouts:
            if lay.spec != spec:
                raise ValueError(f"a layout of spec {lay.spec} was given to read blocks of {spec}")
        spans = [[lay.span(p) for p in pieces] for lay, pieces in requests]
        result = PieceReads([None] * len(keys), {}, {})
        served: dict[int, int] = {}

        def ask(t: int, batch: list[int]) -> list[bool]:
            tier = self._tiers[t].tier
            got = tier.read_spans([(keys[i], spans[i]) for i in batch], spec=spec)
            ok = []
            for i, bufs in zip(batch, got):
                if bufs is None:
                    ok.append(False)
                    continue
                result.reads_by_tier[tier.name] = result.reads_by_tier.get(tier.name, 0) + len(bufs)
                result.bytes_by_tier[tier.name] = result.bytes_by_tier.get(tier.name, 0) + sum(b.nbytes for b in bufs)
                if not all(layouts[i].verify(p, b) for p, b in zip(requests[i][1], bufs)):
                    result.mismatches += 1
                    forget = getattr(tier, "forget_layouts", None)
                    if forget is not None:
                        forget([keys[i]], spec=spec)
                    ok.append(False)
                    continue
                result.pieces[i] = bufs
                served[i] = t
                ok.append(True)
            return ok

        self._rounds(keys, ask)
        with self._lock:
            idx = self._index
            for i, t in served.items():
                slot = idx.slot(keys[i])
                if slot is not None and idx.residency(slot) & (1 << t):
                    self._tiers[t].policy.on_access(keys[i])
                    idx.touch(slot)
        return result

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
            return self._leases.add(slots, ttl_s)

    def unpin(self, lease_id: int) -> bool:
        """End a lease early; False if it is unknown or already expired."""
        with self._lock:
            slots = self._leases.end(lease_id)
            if slots is None:
                return False
            for slot in slots:
                self._index.unpin(slot)
            return True

    @property
    def num_leases(self) -> int:
        with self._lock:
            self._expire_leases()
            return len(self._leases)

    # -- stats -----------------------------------------------------------------------------
    # -- coherence and durability -------------------------------------------------------------
    def drop_local_copies(self, keys: Sequence[bytes] | None, deleted: bool = False) -> int:
        """Forget this process's own copies (every tier not shared) of blocks that another instance
        rewrote (or, ``deleted``, removed) in a shared tier, so the next read goes to the shared
        tier. ``keys=None`` (announcements may have been missed): of every block known to be in a
        shared tier that the shared tier still holds (it may hold other bytes now; a block it lost,
        e.g. to a restart, keeps its local copies). Returns how many blocks lost a copy. Wired to
        ``RedisTier.listen_invalidations``."""
        shared = [t for t, st in enumerate(self._tiers) if st.tier.capabilities.shared]
        if keys is None:
            if not shared:
                return 0
            shared_bits = sum(1 << t for t in shared)
            by_spec: dict[int, list[bytes]] = {}
            with self._lock:
                idx = self._index
                for k, slot in idx.live_items():
                    if idx.residency(slot) & shared_bits and idx.residency(slot) & ~shared_bits:
                        by_spec.setdefault(idx.spec_id(slot), []).append(k)
                specs = {sid: self._specs[sid] for sid in by_spec}
            keys = []
            for sid, ks in by_spec.items():  # tier I/O, outside the lock
                held = self._tiers[shared[0]].tier.contains(ks, spec=specs[sid])
                keys += [k for k, h in zip(ks, held) if h]
        removals: list[tuple[int, bytes, KVSpec]] = []
        n = 0
        with self._lock:
            idx = self._index
            for key in keys:
                slot = idx.slot(bytes(key))
                if slot is None:
                    continue
                spec = self._specs[idx.spec_id(slot)]
                idx.new_generation(slot)  # a copy of the old bytes in flight (a promotion) is not kept
                dropped = False
                for t in range(len(self._tiers)):
                    if idx.slot(key) != slot or not idx.residency(slot) & (1 << t):
                        continue
                    if t not in shared:
                        removals.append((t, bytes(key), spec))
                        dropped = True
                    elif not deleted:
                        continue  # the shared tier holds the new bytes
                    self._mark_removed(t, slot, key, spec)  # a deleted block: gone from the shared tier too
                n += dropped
        self._remove_from_tiers(removals)
        return n

    def flush_to_persistent(self, batch: int = 32) -> dict[str, int]:
        """Write every block that only volatile tiers (device, host) hold into the first persistent
        private tier (disk), parents before children, so that it is found again after a restart
        (``kvtier serve`` does it at a graceful stop). Returns ``{"flushed", "failed"}``: blocks
        now on disk, and blocks the disk refused (no room, write errors)."""
        disk = next((t for t, st in enumerate(self._tiers) if st.tier.capabilities.persistent and not st.tier.capabilities.shared), None)
        if disk is None:
            return {"flushed": 0, "failed": 0}
        durable = sum(1 << t for t, st in enumerate(self._tiers) if st.tier.capabilities.persistent)
        with self._lock:
            idx = self._index
            todo = sorted(
                (idx.depth(slot), slot, key) for key, slot in idx.live_items() if idx.residency(slot) and not idx.residency(slot) & durable
            )
        flushed = failed = 0
        for i in range(0, len(todo), batch):
            with self._lock:  # pinned while copied: not evicted meanwhile, not even by this flush
                idx = self._index
                part = []
                for _, slot, key in todo[i : i + batch]:
                    res = idx.residency(slot) if idx.slot(key) == slot else 0
                    if res and not res & durable:
                        idx.pin(slot)
                        part.append((slot, key, self._specs[idx.spec_id(slot)], (res & -res).bit_length() - 1, idx.generation(slot)))
                self._copy_begin(p[1] for p in part)
            try:
                items = []
                for slot, key, spec, src, gen in part:
                    block = self._tiers[src].tier.get([key], spec=spec)[0]
                    if block is None:
                        failed += 1
                    else:
                        items.append(_Item(slot, key, block, spec, gen))
                self._store_into(disk, items, cascade=False, moving=True)
                with self._lock:
                    for it in items:
                        ok = self._index.slot(it.key) == it.slot and self._index.residency(it.slot) & (1 << disk)
                        flushed += bool(ok)
                        failed += not ok
            finally:
                with self._lock:
                    self._copy_end(p[1] for p in part)
                    self._unpin_live([(p[0], p[1]) for p in part])
        return {"flushed": flushed, "failed": failed}

    def stats(self) -> dict:
        with self._lock:
            self._expire_leases()
            tiers = []
            for st in self._tiers:
                d = st.tier.stats().to_dict()
                wt = st.write_through
                d.update(
                    evictions=st.evictions,
                    demotions=st.demotions,
                    promotions=st.promotions,
                    write_through_pending=len(wt) if wt is not None else 0,
                    write_through_retried=wt.retried if wt is not None else 0,
                    write_through_dropped=wt.dropped if wt is not None else 0,
                    demotion_failures=st.demotion_failures,
                    # blocks the tier kept as written into a buffer it lent (lease_buffer: no copy at the put)
                    adopted=getattr(st.tier, "num_adopted", 0),
                    policy=getattr(st.policy, "name", type(st.policy).__name__),
                    device=st.tier.capabilities.device,
                )
                tiers.append(d)
            return {
                "tiers": tiers,
                "blocks": len(self._index),
                "tenant_bytes": self._ledger.nonzero(),
                "quota_evictions": self._ledger.evictions,
                "quota_refusals": self._ledger.refusals,
                "leases": len(self._leases),
                "last_event_id": self._events.last_id,
                "corrupt": sum(t["corrupt"] for t in tiers),
            }

    def tenant_bytes(self, tenant: str) -> int:
        with self._lock:
            return self._ledger.held(tenant)

    # -- threads -----------------------------------------------------------------------------
    def _submit(self, fn, *args) -> Future:
        if self._closed:
            raise RuntimeError("the store is closed")
        if self._async is None:
            with self._lock:
                if self._async is None:
                    self._async = ThreadPoolExecutor(self.io_workers, thread_name_prefix="kvtier-store")
        return self._async.submit(fn, *args)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools = [self._async] + [st.executor for st in self._tiers]
        for refresher in self._membership.values():
            refresher.close()
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True)
        for st in self._tiers:
            st.tier.close()


def _group_removals(removals: list[tuple[int, bytes, KVSpec]]) -> dict[tuple[int, KVSpec], list[bytes]]:
    out: dict[tuple[int, KVSpec], list[bytes]] = {}
    for t, key, spec in removals:
        out.setdefault((t, spec), []).append(key)
    return out


def _byte_groups(victims: list[_Victim], max_bytes: int) -> Iterator[list[_Victim]]:
    group: list[_Victim] = []
    size = 0
    for v in victims:
        if group and size + v.nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append(v)
        size += v.nbytes
    if group:
        yield group
