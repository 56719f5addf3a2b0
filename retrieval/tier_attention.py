"""Decode attention over a context whose KV stays in the store's tiers, reading only the pages each
KV head selects.

``TierAttention`` is the one entry point (used by ``SparseDecode(store=...)`` in the transformers
connector, by the service's ``/v1/attention`` and by ``bench/tier_attention.py``). Per decode step
and layer (``decode_layer``):

1. **Select, hierarchically, from summaries only.** Level 1 scores every block of the context by
   its block-level Quest bound (``bmin, bmax [H_kv, D]`` per block and layer, kept in memory for
   the open context up to ``metadata_bytes``, past it the least recently used read again) and keeps the ``candidate_blocks`` best blocks per KV head; level 2 scores the
   pages of those blocks only (page bounds ``kmin, kmax [Np, D]`` per block, layer and KV head,
   from a hot LRU of ``summary_bytes``, else one verified range read of that head's summary
   section; the last step's candidates' bounds stay in the context, so a step reads and converts
   only those of new candidates) and keeps the best ``budget / P`` pages per KV head (the first
   page of the context, the attention sink, always). Level 2's work is bounded by ``candidate_blocks`` whatever the context length; level 1
   is one small matrix product per 256 tokens.
2. **Read exactly those pages** through a bounded page cache (hits counted across steps): the
   misses, grouped per block and coalesced into runs, in one ``TieredStore.read_pieces`` call
   (host: views; disk: ``pread``; Redis: pipelined ``GETRANGE``), each range verified.
3. **Prefetch** layer ``l+1``'s pages of the previous step on a thread while layer ``l`` selects,
   reads and attends (after the last layer: layer 0 of the next step); the selections of
   consecutive steps overlap heavily, and the context keeps the last step's gathered pages per
   layer, so a step copies in only the pages that joined its selection. When the query is on a
   CUDA device, the gathered pages go to the device from pinned host memory on a copy stream of
   their own (``TierAttention.copy_stream``), so the copy runs beside the compute stream's work,
   which waits for it by an event; pages a layer selected at the last step stay on the device and
   are not copied again.
4. **Attend**: ``sparse_decode`` over the gathered pages, ``sparse_decode`` over the tokens the
   caller keeps resident (the recent window, the tokens after the last stored block), merged by
   LSE (``merge_states``).

Example::

    att = TierAttention(store, spec, budget=512)
    ctx = att.open(keys)                                   # the stored blocks of one sequence
    for layer in range(spec.num_layers):
        o, lse = att.decode_layer(ctx, layer, q[layer], k_tail[layer], v_tail[layer])

Blocks must be stored with a page-addressable codec (``paged``, ``paged_int8``) in a tier that
serves ranges (host, disk, Redis); ``open`` raises ValueError otherwise.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from kvtier.kvstore.keys import check_keys
from kvtier.kvstore.pages import PageLayout, Summary, coalesce
from kvtier.kvstore.spec import KVSpec
from kvtier.kvstore.store import TieredStore

_MALLOC_TRIM: Any = None  # glibc's malloc_trim, False where there is none (musl, macOS, Windows)


def malloc_trim() -> bool:
    """Return the C heap's free memory to the system (glibc's ``malloc_trim(0)``): freed tensors'
    pages that the allocator would otherwise keep. A no-op returning ``False`` where the C library
    has no ``malloc_trim``."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None).malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            _MALLOC_TRIM = fn
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM is False:
        return False
    _MALLOC_TRIM(0)
    return True


def _half_outward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """``x`` in float16, rounded outward: up (a maximum) or down (a minimum), so a bound computed
    from it still bounds (exact for float16 input; beyond float16's range: +-inf)."""
    h = x.to(torch.float16)
    if x.dtype == torch.float16:
        return h
    off = h.float() < x if up else h.float() > x
    if bool(off.any()):
        h = torch.where(off, torch.nextafter(h, torch.full_like(h, float("inf") if up else float("-inf"))), h)
    return h


def _layout_bytes(lay: PageLayout) -> int:
    """About the memory one block's ``PageLayout`` holds: the object, its key, its checksum arrays
    and their bytes (the meta dict is shared by the blocks of one context: ``_compact_layout``)."""
    import sys

    n = sys.getsizeof(lay) + sys.getsizeof(lay.key) + sys.getsizeof(lay.crc) + sys.getsizeof(lay.sum_crc)
    n += lay.crc.nbytes + lay.sum_crc.nbytes + 2 * 33  # the checksums' bytes objects (their data and header)
    return n + (sys.getsizeof(lay.__dict__) if hasattr(lay, "__dict__") else 0)


_LAYOUT_FIXED_BYTES = 700  # about ``_layout_bytes`` less the checksums' data (sizes a context's capacity before a layout is seen)


def _compact_layout(lay: PageLayout, metas: dict) -> PageLayout:
    """``lay`` with its meta dict shared with the other blocks of the context that have the same
    geometry (``metas``: the interned dicts, by their items less the per-block checksums, which
    the layout keeps as its ``crc`` and ``sum_crc`` arrays): a block's layout then holds its key
    and checksums only, not a dict of ten entries."""
    meta = lay.meta
    ident = repr(sorted((k, v) for k, v in meta.items() if k not in ("crc", "sum_crc")))
    shared = metas.get(ident)
    if shared is None:
        shared = metas[ident] = {k: v for k, v in meta.items() if k not in ("crc", "sum_crc")}
    return PageLayout(lay.key, lay.spec, lay.codec, shared, lay.crc, lay.sum_crc)


@dataclass
class TierAttentionStats:
    steps: int = 0  # decode_layer calls
    prefill_chunks: int = 0  # prefill_layer calls
    pages_selected: int = 0  # (head, page) pairs attended from the tiers
    page_hits: int = 0  # of which found in the page cache
    page_misses: int = 0  # of which read from a tier (by the step itself or by a prefetch)
    prefetched: int = 0  # pages read ahead by the prefetch thread
    device_copies: int = 0  # copies of a layer's gathered pages to a CUDA device (a query on a GPU)
    device_bytes_copied: int = 0  # their bytes
    selected_bytes: int = 0  # the physical minimum: stored bytes of the selected pages
    page_bytes_read: dict = field(default_factory=dict)  # tier -> payload bytes of pages read
    summary_bytes_read: dict = field(default_factory=dict)  # tier -> bytes of page summaries read
    reads: dict = field(default_factory=dict)  # tier -> spans read
    blocks_scored: int = 0  # level 1: blocks scored (summed over steps)
    pages_scored: int = 0  # level 2: pages scored (summed over steps, per KV head)
    mismatches: int = 0  # pieces that failed their checksum (re-read from the next tier)
    # blocks whose metadata (layout and block bounds) an open context read again: evicted from its
    # ``metadata_bytes`` budget, or read once for a regrouping of level 0 (one layout lookup and one
    # verified range read of the block-level bounds each; their bytes in ``metadata_bytes_read``)
    metadata_misses: int = 0
    metadata_bytes_read: dict = field(default_factory=dict)  # tier -> bytes of block bounds read again
    seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        n = self.page_hits + self.page_misses
        return self.page_hits / n if n else 0.0

    @property
    def bytes_read(self) -> int:
        return sum(self.page_bytes_read.values()) + sum(self.summary_bytes_read.values()) + sum(self.metadata_bytes_read.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, bytes_read=self.bytes_read)
        return d


class _LRU:
    """A byte-bounded, thread-safe LRU of tensors."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            v = self._items.get(key)
            if v is not None:
                self._items.move_to_end(key)
            return v

    def put(self, key, value, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, n) = self._items.popitem(last=False)
                self._bytes -= n

    def get_value(self, key):
        v = self.get(key)
        return None if v is None else v[0]

    def get_values(self, keys: list) -> list:
        """The values of ``keys`` (``None`` where missing), under one acquisition of the lock."""
        out: list = []
        with self._lock:
            items = self._items
            for key in keys:
                v = items.get(key)
                if v is None:
                    out.append(None)
                else:
                    items.move_to_end(key)
                    out.append(v[0])
        return out

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class _DeviceSlot:
    """One layer's gathered pages on a CUDA device: ``dev`` holds the K and V of the pages ``rows``
    (per KV head, in slot order), copied from ``staging`` (pinned host memory) on the copy stream;
    ``done`` is recorded after the copy (the compute stream waits for it; the staging buffer is
    written again only after it)."""

    staging: torch.Tensor
    dev: torch.Tensor
    done: Any  # torch.cuda.Event
    rows: list | None = None


@dataclass
class TierContext:
    """One open sequence: its stored blocks, their layouts and block-level bounds.

    While the context's blocks fit its metadata capacity (``TierAttention(metadata_bytes=...)``),
    ``layouts[i]`` and ``bounds[:, :, i]`` are block ``i``'s. Past it (``slot_of`` set), they
    are a fixed number of *slots*, least recently used first evicted: ``slot_of[i]`` is block
    ``i``'s slot (-1: not resident, read again from the store when a step needs it)."""

    keys: list[bytes]
    layouts: list[PageLayout]
    # [L, H_kv, N, 2D]: block-level key maximum then minimum, per layer; float16 rounded outward
    # (``TierAttention(block_bounds_dtype=...)``), so a score computed from them stays an upper bound
    # (slots past the capacity: [L, H_kv, capacity, 2D])
    bounds: torch.Tensor
    groups: torch.Tensor | None = None  # [L, H_kv, M, 2D] float32: the same bounds per group of ``group_blocks`` blocks (level 0)
    group_blocks: int = 0  # blocks per group (0: no level 0)
    _bounds_buffer: torch.Tensor | None = None  # ``bounds`` is a view of it while the context grows (extend)
    layout_bytes: int = 0  # about the memory the layouts hold (``metadata_bytes``)
    last_pages: dict = field(default_factory=dict)  # layer -> [H_kv, n] int64 global page ids of the last step
    # layer -> (blocks per KV head and slot, their page bounds [H_kv, C, Np, F] float32, slots [H_kv, C]) of the last step
    candidates: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)  # layer -> Future of its prefetch
    # layer -> (page ids per KV head and slot, their K and V [H_kv, 2, n, P, D]) of the last step
    page_slots: dict = field(default_factory=dict)
    # layer -> _DeviceSlot: the gathered pages on the query's CUDA device (a query on a GPU only)
    device_slots: dict = field(default_factory=dict)
    capacity: int = 0  # the most blocks whose layouts and bounds stay resident (``metadata_bytes``)
    slot_of: torch.Tensor | None = None  # [>= N] int64 slot of each block, -1: not resident; None: block i in slot i
    slot_block: torch.Tensor | None = None  # [capacity] int64 the block in each slot, -1: free
    slot_used: torch.Tensor | None = None  # [capacity] int64 when each slot was last used (``tick``), -1: free
    slot_layout_bytes: list = field(default_factory=list)  # per slot, its layout's ``_layout_bytes``
    tick: int = 0
    metadata_misses: int = 0  # blocks whose metadata this context read again (``TierAttentionStats.metadata_misses``)
    first_layout: PageLayout | None = None  # block 0's (the geometry: page tokens, range bytes)
    metas: dict = field(default_factory=dict)  # the meta dicts its layouts share (``_compact_layout``)
    lock: Any = field(default_factory=threading.RLock)  # the slots, against the prefetch thread

    @property
    def num_blocks(self) -> int:
        return len(self.keys)

    @property
    def resident_blocks(self) -> int:
        """Blocks whose layout and bounds are in memory."""
        if self.slot_block is None:
            return self.num_blocks
        return int((self.slot_block >= 0).sum())

    def metadata_bytes(self) -> dict:
        """The memory this open context holds, in bytes, per structure (``total``: their sum): the
        block bounds' buffer (its whole capacity) and the resident layouts (together bounded by
        ``TierAttention(metadata_bytes=...)``), the slot tables once the blocks exceed it
        (``slots``: 8 bytes per block), level 0's group bounds (O(sqrt(blocks))), the block keys
        (O(blocks)), and the last step's candidates' page bounds, page ids and gathered pages
        (bounded by the budget and ``candidate_blocks``). The page cache and the hot summaries are
        the ``TierAttention``'s (``TierAttention.memory``, which also counts the blocks read again)."""
        import sys

        def nb(t) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        buf = self._bounds_buffer if self._bounds_buffer is not None else self.bounds
        d = {
            "bounds": nb(buf),
            "groups": nb(self.groups),
            "keys": sys.getsizeof(self.keys) + sum(sys.getsizeof(k) for k in self.keys),
            "layouts": sys.getsizeof(self.layouts) + self.layout_bytes,
            "slots": nb(self.slot_of) + nb(self.slot_block) + nb(self.slot_used) + sys.getsizeof(self.slot_layout_bytes),
            "candidates": sum(nb(c[1]) + nb(c[2]) + 8 * c[2].numel() for c in self.candidates.values()),
            "page_slots": sum(nb(kv) + 8 * sum(len(r) for r in rows) for rows, kv in self.page_slots.values()),
            "last_pages": sum(nb(t) for t in self.last_pages.values()),
            # pinned host staging and device buffers of the gathered pages (a query on a GPU)
            "device_slots": sum(nb(d.staging) + nb(d.dev) for d in self.device_slots.values()),
        }
        d["total"] = sum(d.values())
        return d


MIN_GROUP_BLOCKS = 4  # level 0 runs once its groups would hold at least this many blocks


class TierAttention:
    """Decode attention over KV stored in a ``TieredStore`` (see the module docstring).

    Args:
        store, spec: where the blocks are and what they are.
        budget: tokens per KV head attended from the stored context (whole pages; the sink page
            included). A context of at most ``budget`` tokens is attended in full.
        candidate_blocks: blocks per KV head kept by level 1 (``None``: every block, one level).
        candidate_groups: groups of blocks per KV head kept by level 0, which runs once the
            context has at least ``MIN_GROUP_BLOCKS`` blocks per kept group (groups of
            ``ceil(sqrt(N / candidate_groups))`` blocks, so levels 0 and 1 each score about
            ``sqrt(N * candidate_groups)`` bounds: selection grows as the square root of the
            context); ``None``: no level 0.
        full_score_pages: a context of at most this many pages per KV head is scored page by page
            (level 2 alone): level 1's block bounds prune only longer contexts. Measured on the
            reference model at 4K tokens (``bench/tier_ppl_sweep.py``): pruning 62 blocks to 32 by
            their bounds cost +0.9% perplexity, and 1,024 pages cost about what level 2 scores at 1M.
        mean_weight: how level 2 scores a page: ``(1 - w)`` x its Quest bound plus ``w`` x the
            query's product with the page's mean key (``0``: the bound alone, Quest).
        page_cache_bytes: the page cache (decoded pages of every open context, LRU).
        summary_bytes: the hot page summaries (kmin, kmax per block and layer, LRU).
        prefetch: read layer l+1's previous pages on a thread while layer l runs.
        block_bounds_dtype: how an open context keeps level 1's block bounds (``L x H_kv x 2D``
            values per block, the one structure that grows with the context, up to ``metadata_bytes``): ``torch.float16``
            (the default; half of float32's bytes; rounded outward, the maximum up and the
            minimum down, so a block's score stays an upper bound of its pages'; exact for blocks
            stored in float16, whose summaries are float16) or ``torch.float32``.
        metadata_bytes: the most an open context keeps of its blocks' layouts and level-1 block
            bounds (``L x H_kv x 2D`` bounds and ``8 x L x H_kv x Np`` bytes of checksums per
            block, plus ~0.7 KiB; ``None``: unbounded). A context whose blocks fit is as before (the
            default, 1 GiB, holds ~1.6M tokens of Llama-3-8B's 32 layers); past it, the blocks least
            recently used by a selection are evicted and read again from the store when a step
            needs them (one layout lookup and one verified read of the block-level bounds each,
            counted in ``stats().metadata_misses``), and level 0's regrouping (when the group size
            grows) reads the evicted blocks' bounds once. What stays resident per block is then
            its key and 8 bytes of slot tables; level 0's group bounds are O(sqrt(blocks)).
            Selections, and so outputs, are the same whatever the budget.
    """

    def __init__(
        self,
        store: TieredStore,
        spec: KVSpec,
        *,
        budget: int = 512,
        candidate_blocks: int | None = 32,
        candidate_groups: int | None = 16,
        full_score_pages: int = 1024,
        mean_weight: float = 0.0,
        page_cache_bytes: int = 256 << 20,
        summary_bytes: int = 256 << 20,
        prefetch: bool = True,
        block_bounds_dtype: torch.dtype = torch.float16,
        metadata_bytes: int | None = 1 << 30,
    ) -> None:
        if not isinstance(store, TieredStore):
            raise ValueError(f"store must be a kvstore.TieredStore, got {type(store).__name__}")
        for name, v, low in (
            ("budget", budget, 1),
            ("full_score_pages", full_score_pages, 0),
            ("page_cache_bytes", page_cache_bytes, 0),
            ("summary_bytes", summary_bytes, 0),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        for name, c in (("candidate_blocks", candidate_blocks), ("candidate_groups", candidate_groups)):
            if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
                raise ValueError(f"{name} must be a positive int or None, got {c!r}")
        self.store, self.spec = store, spec
        self.budget = budget
        self.candidate_blocks = candidate_blocks
        self.candidate_groups = candidate_groups
        self.full_score_pages = full_score_pages
        if isinstance(mean_weight, bool) or not isinstance(mean_weight, (int, float)) or not 0.0 <= mean_weight <= 1.0:
            raise ValueError(f"mean_weight must be a number in [0, 1], got {mean_weight!r}")
        self.mean_weight = float(mean_weight)
        self.prefetch = prefetch
        if block_bounds_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"block_bounds_dtype must be torch.float16 or torch.float32, got {block_bounds_dtype!r}")
        self.block_bounds_dtype = block_bounds_dtype
        if metadata_bytes is not None and (isinstance(metadata_bytes, bool) or not isinstance(metadata_bytes, int) or metadata_bytes < 0):
            raise ValueError(f"metadata_bytes must be a non-negative int or None, got {metadata_bytes!r}")
        self.metadata_bytes = metadata_bytes
        # pages are decoded once into the dtype attention computes in: float32 on CPU (no fast
        # float16 arithmetic there), the spec's dtype on a GPU
        self.compute_dtype = torch.float32 if not torch.cuda.is_available() else spec.torch_dtype
        self.pages = _LRU(page_cache_bytes)
        self.summaries = _LRU(summary_bytes)
        self._stats = TierAttentionStats()
        self._stats_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-prefetch") if prefetch else None
        self._copy_streams: dict = {}  # CUDA device -> the stream that copies gathered pages to it

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # -- stats -----------------------------------------------------------------------------
    def stats(self) -> TierAttentionStats:
        with self._stats_lock:
            s = self._stats
            return TierAttentionStats(
                **{
                    **asdict(s),
                    "page_bytes_read": dict(s.page_bytes_read),
                    "summary_bytes_read": dict(s.summary_bytes_read),
                    "metadata_bytes_read": dict(s.metadata_bytes_read),
                    "reads": dict(s.reads),
                }
            )

    def memory(self, ctx: TierContext | None = None) -> dict:
        """Bytes held: the page cache and the hot summaries (used, and their budgets), the
        per-context metadata budget (``metadata_budget``, ``None``: unbounded), and the open
        context ``ctx``'s structures (``TierContext.metadata_bytes``, under ``metadata``) with its
        blocks resident and in all (``metadata_blocks``, ``blocks``) and the blocks whose metadata
        it read again (``metadata_misses``)."""
        d: dict[str, Any] = {
            "page_cache": self.pages.used_bytes,
            "page_cache_budget": self.pages.max_bytes,
            "summaries": self.summaries.used_bytes,
            "summaries_budget": self.summaries.max_bytes,
            "metadata_budget": self.metadata_bytes,
        }
        if ctx is not None:
            d["metadata"] = ctx.metadata_bytes()
            d["metadata_blocks"] = ctx.resident_blocks
            d["blocks"] = ctx.num_blocks
            d["metadata_misses"] = ctx.metadata_misses
        return d

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats = TierAttentionStats()

    def _count(self, res, summary: bool | str) -> None:
        with self._stats_lock:
            s = self._stats
            target = s.metadata_bytes_read if summary == "metadata" else s.summary_bytes_read if summary else s.page_bytes_read
            for t, n in res.bytes_by_tier.items():
                target[t] = target.get(t, 0) + n
            for t, n in res.reads_by_tier.items():
                s.reads[t] = s.reads.get(t, 0) + n
            s.mismatches += res.mismatches

    # -- contexts --------------------------------------------------------------------------
    def _capacity(self, lay: PageLayout | None) -> int:
        """The most blocks an open context keeps the metadata of (``metadata_bytes``); with no
        layout seen yet, sized for 16-token pages."""
        if self.metadata_bytes is None:
            return 1 << 62
        spec = self.spec
        L, H = spec.num_layers, spec.num_kv_heads
        bounds = L * H * 2 * spec.head_dim * (2 if self.block_bounds_dtype == torch.float16 else 4)
        if lay is None:
            lay_bytes = 8 * (L * H * max(1, spec.block_tokens // 16) + L * H + 1) + _LAYOUT_FIXED_BYTES
        else:
            lay_bytes = _layout_bytes(lay)
        return max(1, self.metadata_bytes // (bounds + lay_bytes))

    def _decode_bounds(self, layouts: list[PageLayout], bufs: list) -> torch.Tensor:
        """``[L, H_kv, n, 2D]`` in ``block_bounds_dtype``: the block-level bounds read for ``layouts``."""
        spec = self.spec
        L, H, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
        half = self.block_bounds_dtype == torch.float16
        bounds = torch.empty(L, H, len(layouts), 2 * D, dtype=self.block_bounds_dtype)
        for i, (lay, b) in enumerate(zip(layouts, bufs)):
            lo, hi = lay.decode_summary(L, b[0])  # [L, H, D]
            if half:
                bounds[:, :, i, :D], bounds[:, :, i, D:] = _half_outward(hi, up=True), _half_outward(lo, up=False)
            else:
                bounds[:, :, i, :D], bounds[:, :, i, D:] = hi.float(), lo.float()
        return bounds

    def open(self, keys: Sequence[bytes]) -> TierContext:
        """The context of a chain of stored blocks: their layouts and block-level bounds (read
        once: one verified range read per block). ValueError if a block is not stored paged.
        A chain longer than the context's metadata capacity (``metadata_bytes``) is opened a
        capacity at a time (``extend``): the least recently used blocks' metadata is evicted."""
        keys = check_keys(keys)
        guess = self._capacity(None)
        ctx = self._open_fit(keys[:guess])
        if ctx.num_blocks > ctx.capacity:  # the guess was short (a codec with other pages): keep the capacity's first
            self._to_slots(ctx, len(keys) - ctx.num_blocks)
        for a in range(guess, len(keys), guess):
            self.extend(ctx, keys[a : a + guess])
        return ctx

    def _open_fit(self, keys: Sequence[bytes]) -> TierContext:
        """``open`` of at most about a capacity of blocks: every block in its own slot."""
        spec = self.spec
        layouts = self.store.page_layouts(spec, keys) if keys else []
        missing = [i for i, lay in enumerate(layouts) if lay is None]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(keys)} blocks (first: position {missing[0]}) are not stored with a "
                "page-addressable codec ('paged', 'paged_int8') in a tier that serves ranges"
            )
        L, H, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
        metas: dict = {}
        layouts = [_compact_layout(lay, metas) for lay in layouts]
        # one row per block, for level 1's one matrix product per layer ([q+, q-] [H, G, 2D] @ [H, N, 2D]^T)
        # and for gathering the rows of the blocks level 0 kept
        if keys:
            bounds = self._decode_bounds(layouts, self._read(layouts, [[Summary(L)]] * len(keys), summary=True))
        else:
            bounds = torch.empty(L, H, 0, 2 * D, dtype=self.block_bounds_dtype)
        lb = [_layout_bytes(lay) for lay in layouts]
        ctx = TierContext(list(keys), layouts, bounds, layout_bytes=sum(lb), metas=metas, slot_layout_bytes=lb)
        ctx.first_layout = layouts[0] if layouts else None
        ctx.capacity = self._capacity(ctx.first_layout)
        self._group(ctx)
        return ctx

    def _to_slots(self, ctx: TierContext, more: int) -> None:
        """Past the capacity: blocks go into ``capacity`` slots, the first ones where they are
        (their recency: their order), and ``more`` blocks are coming (``slot_of`` grows)."""
        N, cap = ctx.num_blocks, ctx.capacity
        n0 = min(N, cap)
        old = ctx._bounds_buffer if ctx._bounds_buffer is not None else ctx.bounds
        if old.shape[2] != cap:
            buf = torch.empty(*old.shape[:2], cap, old.shape[3], dtype=old.dtype)
            buf[:, :, :n0] = old[:, :, :n0]
            ctx.bounds = ctx._bounds_buffer = old = None
        else:
            buf = old
        ctx._bounds_buffer = ctx.bounds = buf
        ctx.slot_of = torch.full((max(N + more, 64),), -1, dtype=torch.int64)
        ctx.slot_of[:n0] = torch.arange(n0)
        ctx.slot_block = torch.full((cap,), -1, dtype=torch.int64)
        ctx.slot_block[:n0] = torch.arange(n0)
        ctx.slot_used = torch.full((cap,), -1, dtype=torch.int64)
        ctx.slot_used[:n0] = torch.arange(n0)
        ctx.tick = n0
        ctx.layouts = ctx.layouts[:n0] + [ctx.first_layout] * (cap - n0)  # type: ignore[list-item]
        ctx.slot_layout_bytes = ctx.slot_layout_bytes[:n0] + [0] * (cap - n0)
        ctx.layout_bytes = sum(ctx.slot_layout_bytes)

    def _insert(self, ctx: TierContext, blocks: list[int], layouts: list[PageLayout], bounds: torch.Tensor, protect=None) -> None:
        """Put ``blocks``' metadata into the free or least recently used slots, but those of
        ``protect`` (slots a selection is using); at most the capacity's last ones."""
        assert ctx.slot_of is not None and ctx.slot_block is not None and ctx.slot_used is not None
        cap = ctx.capacity
        if len(blocks) > cap:
            blocks, layouts, bounds = blocks[-cap:], layouts[-cap:], bounds[:, :, -cap:]
        used = ctx.slot_used
        if protect is not None and len(protect):
            used = used.clone()
            used[protect] = 1 << 62
        victims = used.topk(len(blocks), largest=False).indices
        gone = ctx.slot_block[victims]
        ctx.slot_of[gone[gone >= 0]] = -1
        b = torch.tensor(blocks, dtype=torch.int64)
        ctx.slot_block[victims] = b
        ctx.slot_of[b] = victims
        ctx.slot_used[victims] = ctx.tick
        ctx.tick += 1
        ctx.bounds.index_copy_(2, victims, bounds.to(ctx.bounds.dtype))
        for sl, lay in zip(victims.tolist(), layouts):
            n = _layout_bytes(lay)
            ctx.layout_bytes += n - ctx.slot_layout_bytes[sl]
            ctx.slot_layout_bytes[sl] = n
            ctx.layouts[sl] = lay

    def _read_blocks(self, ctx: TierContext, blocks: list[int]) -> tuple[list[PageLayout], torch.Tensor]:
        """Blocks' layouts and bounds ``[L, H_kv, n, 2D]`` read again from the store (metadata
        misses: counted). RuntimeError if a block vanished from the store."""
        keys = [ctx.keys[b] for b in blocks]
        lays = self.store.page_layouts(self.spec, keys)
        if any(lay is None for lay in lays):
            raise RuntimeError(f"{sum(lay is None for lay in lays)} block(s) of the context vanished from the store")
        lays = [_compact_layout(lay, ctx.metas) for lay in lays]
        bounds = self._decode_bounds(lays, self._read(lays, [[Summary(self.spec.num_layers)]] * len(lays), summary="metadata"))
        ctx.metadata_misses += len(blocks)
        with self._stats_lock:
            self._stats.metadata_misses += len(blocks)
        return lays, bounds

    def _rows(self, ctx: TierContext, layer: int, bid: torch.Tensor | None) -> torch.Tensor:
        """Level 1's input: the block bounds ``[H_kv, K, 2D]`` of ``layer`` for the blocks
        ``bid [H_kv, K]`` of each KV head (``None``: every block, ``[H_kv, N, 2D]``); in slot mode
        through the slots, the missing blocks read again (kept when they fit the capacity)."""
        H = self.spec.num_kv_heads
        if ctx.slot_of is None:
            return ctx.bounds[layer] if bid is None else ctx.bounds[layer][torch.arange(H)[:, None], bid]
        assert ctx.slot_block is not None and ctx.slot_used is not None
        if bid is None:
            bid = torch.arange(ctx.num_blocks).expand(H, ctx.num_blocks)
        with ctx.lock:
            u, inv = torch.unique(bid, return_inverse=True)
            slots = ctx.slot_of[u]
            have = slots >= 0
            if not bool(have.all()):
                miss = u[~have]
                if u.numel() <= ctx.capacity:
                    lays, b = self._read_blocks(ctx, miss.tolist())
                    self._insert(ctx, miss.tolist(), lays, b, protect=slots[have])
                    slots = ctx.slot_of[u]
                else:  # more blocks than the capacity: this call's rows, the missing ones read and not kept
                    rows = torch.empty(H, u.numel(), ctx.bounds.shape[3], dtype=ctx.bounds.dtype)
                    rows[:, have] = ctx.bounds[layer][:, slots[have]]
                    rows[:, ~have] = self._read_blocks(ctx, miss.tolist())[1][layer]
                    ctx.slot_used[slots[have]] = ctx.tick
                    ctx.tick += 1
                    return torch.gather(rows, 1, inv.unsqueeze(-1).expand(-1, -1, rows.shape[2]))
            ctx.slot_used[slots] = ctx.tick
            ctx.tick += 1
            return ctx.bounds[layer][torch.arange(H)[:, None], slots[inv]]

    def _layouts(self, ctx: TierContext, blocks: list[int]) -> list[PageLayout]:
        """The layouts of ``blocks`` (slot mode: the missing ones read again, kept when they fit)."""
        if ctx.slot_of is None:
            return [ctx.layouts[b] for b in blocks]
        assert ctx.slot_used is not None
        with ctx.lock:
            u = sorted(set(blocks))
            ut = torch.tensor(u, dtype=torch.int64)
            slots = ctx.slot_of[ut]
            have = slots >= 0
            extra: dict[int, PageLayout] = {}
            if not bool(have.all()):
                miss = ut[~have].tolist()
                lays, b = self._read_blocks(ctx, miss)
                if len(u) <= ctx.capacity:
                    self._insert(ctx, miss, lays, b, protect=slots[have])
                    slots = ctx.slot_of[ut]
                else:
                    extra = dict(zip(miss, lays))
            ok = slots[slots >= 0]
            ctx.slot_used[ok] = ctx.tick
            ctx.tick += 1
            where = dict(zip(u, slots.tolist()))
            return [extra[b] if b in extra else ctx.layouts[where[b]] for b in blocks]

    def _group(self, ctx: TierContext, first_new: int = 0, new_bounds: torch.Tensor | None = None) -> None:
        """(Re)build level 0's bounds: groups of ``ceil(sqrt(N / candidate_groups))`` blocks; only
        the groups from block ``first_new`` on when the group size did not change. In slot mode
        ``new_bounds`` are blocks ``first_new..N``'s (not in the slots yet): the last old group is
        merged with them (maxima and minima: exact), and a new group size reads the evicted
        blocks' bounds again, a slice at a time."""
        N, C0 = ctx.num_blocks, self.candidate_groups
        S = 0 if C0 is None or not N else math.ceil(math.sqrt(N / C0))
        if S < MIN_GROUP_BLOCKS:
            ctx.groups, ctx.group_blocks = None, 0
            return

        def reduce(b: torch.Tensor) -> torch.Tensor:  # [L, H, n, 2D] -> [L, H, ceil(n / S), 2D] float32
            D = b.shape[3] // 2
            pad = -b.shape[2] % S
            if pad:  # the last group is short: pad with its last block's bounds (they change no maximum or minimum)
                b = torch.cat([b, b[:, :, -1:].expand(-1, -1, pad, -1)], 2)
            g = b.reshape(*b.shape[:2], b.shape[2] // S, S, 2 * D)
            return torch.cat([g[..., :D].amax(3), g[..., D:].amin(3)], 3).float()

        if ctx.slot_of is None:
            g0 = first_new // S if S == ctx.group_blocks and ctx.groups is not None else 0
            tail = reduce(ctx.bounds[:, :, g0 * S :])  # [L, H, M - g0, 2D]
            ctx.groups = tail if g0 == 0 or ctx.groups is None else torch.cat([ctx.groups[:, :, :g0], tail], 2)
            ctx.group_blocks = S
            return
        assert new_bounds is not None and new_bounds.shape[2] == N - first_new
        if S == ctx.group_blocks and ctx.groups is not None:
            g0 = first_new // S
            b = new_bounds
            k = first_new - g0 * S
            if k:  # the old part of the last group: its bound stands for its blocks
                b = torch.cat([ctx.groups[:, :, g0 : g0 + 1].to(b.dtype).expand(-1, -1, k, -1), b], 2)
            ctx.groups = torch.cat([ctx.groups[:, :, :g0], reduce(b)], 2)
            return
        step = S * max(1, min(ctx.capacity, 4096) // S)
        parts = []
        for a in range(0, N, step):
            e = min(N, a + step)
            if a >= first_new:
                parts.append(reduce(new_bounds[:, :, a - first_new : e - first_new]))
                continue
            old = torch.arange(a, min(e, first_new))
            with ctx.lock:
                slots = ctx.slot_of[old]
                have = slots >= 0
                b = torch.empty(*ctx.bounds.shape[:2], len(old), ctx.bounds.shape[3], dtype=ctx.bounds.dtype)
                b[:, :, have] = ctx.bounds[:, :, slots[have]]
            if not bool(have.all()):
                b[:, :, ~have] = self._read_blocks(ctx, old[~have].tolist())[1]
            if e > first_new:
                b = torch.cat([b, new_bounds[:, :, : e - first_new]], 2)
            parts.append(reduce(b))
        ctx.groups = torch.cat(parts, 2)
        ctx.group_blocks = S

    def extend(self, ctx: TierContext, keys: Sequence[bytes]) -> None:
        """Append newly stored blocks (the chain's next ones) to an open context (amortised: the
        block bounds grow in a buffer whose capacity grows by a quarter, so at most a quarter of it
        is unused, up to the context's metadata capacity; the old buffer is freed as soon as it is
        copied; level 0 regroups only its last groups). Past the capacity the new blocks take the
        least recently used blocks' slots."""
        keys = check_keys(keys)
        step = min(ctx.capacity or self._capacity(None), self._capacity(None))
        if len(keys) > step:
            for a in range(0, len(keys), step):
                self.extend(ctx, keys[a : a + step])
            return
        more = self._open_fit(keys)
        N0, N1 = ctx.num_blocks, ctx.num_blocks + more.num_blocks
        if not ctx.capacity or ctx.first_layout is None:
            ctx.capacity, ctx.first_layout = more.capacity, more.first_layout
        more_layouts = [_compact_layout(lay, ctx.metas) for lay in more.layouts]  # the context's shared metas
        if ctx.slot_of is None and N1 <= ctx.capacity:
            ctx.keys += more.keys
            ctx.layouts += more_layouts
            ctx.layout_bytes += more.layout_bytes
            ctx.slot_layout_bytes += more.slot_layout_bytes
            buf = ctx._bounds_buffer
            if buf is None or buf.shape[2] < N1 or buf.dtype != more.bounds.dtype:
                cap = min(ctx.capacity, max(N1, N0 + N0 // 4, 64))
                new = torch.empty(*more.bounds.shape[:2], cap, more.bounds.shape[3], dtype=more.bounds.dtype)
                new[:, :, :N0] = ctx.bounds
                ctx.bounds = buf = None  # the old buffer goes now, before the next allocation
                ctx._bounds_buffer = buf = new
            buf[:, :, N0:N1] = more.bounds
            ctx.bounds = buf[:, :, :N1]
            self._group(ctx, N0)
        else:
            with ctx.lock:
                if ctx.slot_of is None:
                    self._to_slots(ctx, N1 - N0)
                assert ctx.slot_of is not None
                if ctx.slot_of.shape[0] < N1:
                    grown = torch.full((max(N1, N0 + N0 // 4),), -1, dtype=torch.int64)
                    grown[:N0] = ctx.slot_of[:N0]
                    ctx.slot_of = grown
                ctx.keys += more.keys
            self._group(ctx, N0, more.bounds)
            with ctx.lock:
                self._insert(ctx, list(range(N0, N1)), more_layouts, more.bounds)
        ctx.last_pages.clear()  # page ids of the last step stay valid, but the prefetch may skip new blocks: start over
        ctx.candidates.clear()
        ctx.page_slots.clear()

    def _read(self, layouts: list[PageLayout], pieces: list[list], *, summary: bool | str) -> list[list[memoryview]]:
        """Verified pieces, or RuntimeError if a block cannot be read from any tier (a layout read
        before may be stale: it is read again once)."""
        res = self.store.read_pieces(self.spec, list(zip(layouts, pieces)))
        self._count(res, summary)
        bad = [i for i, p in enumerate(res.pieces) if p is None]
        if bad:
            fresh = self.store.page_layouts(self.spec, [layouts[i].key for i in bad])
            if any(f is None for f in fresh):
                raise RuntimeError(f"{sum(f is None for f in fresh)} block(s) of the context vanished from the store")
            for i, f in zip(bad, fresh):
                layouts[i] = f
            again = self.store.read_pieces(self.spec, [(f, pieces[i]) for i, f in zip(bad, fresh)])
            self._count(again, summary)
            if any(p is None for p in again.pieces):
                raise RuntimeError("a block of the context could not be read and verified from any tier")
            for i, p in zip(bad, again.pieces):
                res.pieces[i] = p
        return res.pieces

    # -- selection -------------------------------------------------------------------------
    def _page_bounds(self, ctx: TierContext, layer: int, pairs: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The page bounds of each ``(block, KV head)`` of ``layer`` in ``pairs``: ``[Np, 2D]`` each
        (the page's key maximum then minimum, then its mean key when ``mean_weight``: ``3D``; as
        stored, float16 for float16 blocks), from the hot LRU (one entry per block, layer and KV
        head) or read: only the missing heads' sections of a block (one verified range each,
        summary layout 2), or the whole layer from a block written before per-head summaries
        (layout 1)."""
        keys = ctx.keys
        flat = [(keys[b], layer, h) for b, h in pairs]
        out = self.summaries.get_values(flat)
        miss: dict[int, set[int]] = {}
        for (b, h), v in zip(pairs, out):
            if v is None:
                miss.setdefault(b, set()).add(h)
        if miss:
            blocks = sorted(miss)
            lays = self._layouts(ctx, blocks)
            heads = [sorted(miss[b]) if lay.head_summaries else None for b, lay in zip(blocks, lays)]
            pieces = [[Summary(layer)] if hs is None else [Summary(layer, h) for h in hs] for hs in heads]
            bufs = self._read(lays, pieces, summary=True)
            got: dict[tuple, torch.Tensor] = {}
            for b, lay, hs, b_bufs in zip(blocks, lays, heads, bufs):
                if hs is None:  # layout 1: the whole layer, every head cached
                    kmin, kmax, kmean = lay.decode_summary(layer, b_bufs[0])
                    parts = [kmax, kmin, kmean] if self.mean_weight else [kmax, kmin]
                    t = torch.cat(parts, 2)  # [H, Np, 2D or 3D]
                    per_head = {h: t[h].clone() for h in range(t.shape[0])}
                else:
                    per_head = {}
                    for h, buf in zip(hs, b_bufs):
                        kmin, kmax, kmean = lay.decode_summary(layer, buf, h)
                        per_head[h] = torch.cat([kmax, kmin, kmean] if self.mean_weight else [kmax, kmin], 1)  # [Np, 2D or 3D]
                for h, t in per_head.items():
                    got[(keys[b], layer, h)] = t
                    self.summaries.put((keys[b], layer, h), t, t.numel() * t.element_size())
            out = [got[k] if v is None else v for k, v in zip(flat, out)]
        return out

    def select(self, ctx: TierContext, layer: int, q: torch.Tensor, budget: int | None = None, *, _before_level2=None) -> torch.Tensor:
        """Global page ids ``[H_kv, n]`` (``block * Np + page``, ascending) each KV head attends for
        the decode query ``q [H_q, D]`` of ``layer`` (``budget``: this call's, default the instance's)."""
        spec = self.spec
        H, D, N = spec.num_kv_heads, spec.head_dim, ctx.num_blocks
        Np = spec.block_tokens // ctx.first_layout.page_tokens if N and ctx.first_layout is not None else 1
        P = spec.block_tokens // Np
        total = N * Np
        want = min(total, max(1, (self.budget if budget is None else budget) // P))
        if want >= total:
            return torch.arange(total).expand(H, total)
        qf = q.float().view(H, -1, D)  # [H, G, D]
        pos, neg = qf.clamp_min(0), qf.clamp_max(0)
        qq = torch.cat([pos, neg], 2)  # [H, G, 2D]
        # level 1: blocks by their block-level bound
        C = N if self.candidate_blocks is None or total <= self.full_score_pages else min(N, max(self.candidate_blocks, -(-want // Np)))
        scored = 0
        if C < N and ctx.groups is not None:
            # level 0: groups of S blocks by their bound, then the blocks of the kept groups only
            S, M = ctx.group_blocks, ctx.groups.shape[2]
            C0 = min(M, max(self.candidate_groups or M, -(-2 * C // S) + 1))  # the kept groups hold > 2C blocks
            s0 = torch.bmm(qq, ctx.groups[layer].transpose(1, 2)).amax(1)  # [H, M]
            s0[:, 0] = float("inf")  # the sink's group
            gk = s0.topk(C0, dim=1).indices  # [H, C0]
            bid = (gk.unsqueeze(-1) * S + torch.arange(S)).flatten(1)  # [H, C0*S]
            valid = bid < N
            bid = bid.clamp_max(N - 1)
            bb = self._rows(ctx, layer, bid).float()  # [H, C0*S, 2D]
            s1 = torch.bmm(qq, bb.transpose(1, 2)).amax(1).masked_fill_(~valid, float("-inf"))
            s1 = torch.where(bid == 0, float("inf"), s1)
            cand = torch.gather(bid, 1, s1.topk(C, dim=1).indices)  # [H, C]
            scored = M + bid.shape[1]
        elif C < N:
            s1 = torch.bmm(qq, self._rows(ctx, layer, None).float().transpose(1, 2)).amax(1)  # [H, N]
            s1[:, 0] = float("inf")  # the sink's block
            cand = s1.topk(C, dim=1).indices  # [H, C]
            scored = N
        else:
            cand = torch.arange(N).expand(H, N)
        rows = cand.tolist()
        if _before_level2 is not None:
            _before_level2()  # a prefetch of this layer's pages ends here
        w = self.mean_weight
        q2 = torch.cat([(1 - w) * pos, (1 - w) * neg, w * qf], 2) if w else qq  # the bound and the mean key's score, weighted
        if C < N:
            slots, pb = self._candidate_bounds(ctx, layer, rows)  # [H, C] block per slot; [H, C * Np, 2D or 3D] float32
        else:  # every block is a candidate: scored once per step, nothing kept
            slots = cand
            pb = torch.stack(self._page_bounds(ctx, layer, [(b, h) for h, row in enumerate(rows) for b in row])).float().view(H, C * Np, -1)
        s2 = torch.bmm(q2, pb.transpose(1, 2)).amax(1)  # [H, C*Np]
        gid = (slots.unsqueeze(-1) * Np + torch.arange(Np)).reshape(H, C * Np)  # global page ids
        s2 = torch.where(gid == 0, float("inf"), s2)  # the sink page
        top = s2.topk(min(want, C * Np), dim=1).indices
        with self._stats_lock:
            self._stats.blocks_scored += scored
            self._stats.pages_scored += C * Np
        return torch.gather(gid, 1, top).sort(1).values

    # -- reading ---------------------------------------------------------------------------
    def _fetch(self, ctx: TierContext, layer: int, page_ids, *, prefetch: bool = False) -> list[list[torch.Tensor]]:
        """Per KV head, the ``[2, P, D]`` page tensors of ``page_ids [H_kv, n]`` (or a list per KV
        head, of any lengths) (cache, then tiers)."""
        assert ctx.first_layout is not None
        Np = self.spec.block_tokens // ctx.first_layout.page_tokens
        rows = page_ids if isinstance(page_ids, list) else page_ids.tolist()
        got: list[list] = [[None] * len(r) for r in rows]
        need: dict[int, dict[int, list[tuple[int, int]]]] = {}  # block -> range id -> [(head, slot)]
        hits = 0
        H = len(rows)
        where = [(h, j, g // Np, (layer * H + h) * Np + g % Np) for h, row in enumerate(rows) for j, g in enumerate(row)]
        keys = ctx.keys
        for (h, j, b, rid), t in zip(where, self.pages.get_values([(keys[b], rid) for _, _, b, rid in where])):
            if t is None:
                need.setdefault(b, {}).setdefault(rid, []).append((h, j))
            else:
                got[h][j] = t
                hits += 1
        misses = sum(len(v) for d in need.values() for v in d.values())
        if need:
            blocks = sorted(need)
            runs = [coalesce(list(need[b])) for b in blocks]
            lays = self._layouts(ctx, blocks)
            bufs = self._read(lays, runs, summary=False)
            for b, lay, b_runs, b_bufs in zip(blocks, lays, runs, bufs):
                for run, buf in zip(b_runs, b_bufs):
                    pages = lay.decode_pages(buf, run.num, self.compute_dtype)  # [num, 2, P, D]
                    for i in range(run.num):
                        rid = run.first + i
                        # a page of a longer run is copied out: a view would keep the whole run's
                        # storage alive for as long as any of its pages stays cached (the LRU counts pages)
                        t = pages[i].clone() if run.num > 1 else pages[i]
                        self.pages.put((ctx.keys[b], rid), t, t.numel() * t.element_size())
                        for h, j in need[b][rid]:
                            got[h][j] = t
        with self._stats_lock:
            s = self._stats
            if prefetch:
                s.prefetched += misses
            else:
                s.page_hits += hits
                s.page_misses += misses
        return got

    def _candidate_bounds(self, ctx: TierContext, layer: int, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Level 2's input for the candidate blocks ``rows[h]`` of each KV head: ``(slots [H, C],
        bounds [H, C * Np, F] float32)``, the page bounds of block ``slots[h, c]`` at rows ``c * Np``
        on. The context keeps the last step's per layer, so a step converts and copies only the
        bounds of the blocks that became candidates (the others keep their slots)."""
        H, C = len(rows), len(rows[0])
        kept = ctx.candidates.get(layer)
        if kept is None or kept[1].shape[1] != C:
            pb = torch.stack(self._page_bounds(ctx, layer, [(b, h) for h, row in enumerate(rows) for b in row]))
            slots, buf = torch.tensor(rows), pb.float().view(H, C, *pb.shape[1:])
            ctx.candidates[layer] = ([list(r) for r in rows], buf, slots)
            return slots, buf.view(H, -1, buf.shape[-1])
        old_rows, buf, slots = kept
        pairs, where = [], []
        for h, (row, old) in enumerate(zip(rows, old_rows)):
            new = set(row)
            free = [c for c, b in enumerate(old) if b not in new]
            if not free:
                continue
            have = set(old)
            for c, b in zip(free, (b for b in row if b not in have)):
                old[c] = b
                pairs.append((b, h))
                where.append((h, c))
        if pairs:
            for (h, c), t in zip(where, self._page_bounds(ctx, layer, pairs)):
                buf[h, c] = t
            hs, cs = zip(*where)
            slots[list(hs), list(cs)] = torch.tensor([b for b, _ in pairs])
        return slots, buf.view(H, -1, buf.shape[-1])

    def _prefetch(self, ctx: TierContext, layer: int) -> None:
        """Read ahead, on the thread, the pages ``layer`` used at the last step."""
        ids = ctx.last_pages.get(layer)
        if self._pool is None or ids is None or layer in ctx.pending:
            return

        def work() -> None:
            self._fetch(ctx, layer, ids, prefetch=True)

        ctx.pending[layer] = self._pool.submit(work)

    # -- attention -------------------------------------------------------------------------
    def decode_layer(
        self,
        ctx: TierContext,
        layer: int,
        q: torch.Tensor,
        k_local: torch.Tensor | None = None,
        v_local: torch.Tensor | None = None,
        *,
        scale: float | None = None,
        budget: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode attention of ``q [H_q, D]`` for ``layer`` over the stored context plus the
        resident tokens ``k_local, v_local [H_kv, W, D]`` (those after the stored blocks; ``None``:
        none); ``budget``: this call's (default the instance's). Returns ``(o [H_q, D] float32,
        lse [H_q] float32)``."""
        from kvtier.sparse_attn import merge_states, sparse_decode

        spec = self.spec
        H, D = spec.num_kv_heads, spec.head_dim
        if not 0 <= layer < spec.num_layers:
            raise ValueError(f"layer must be in [0, {spec.num_layers}), got {layer}")
        if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.shape[1] != D or q.shape[0] % H:
            raise ValueError(
                f"q must be [H_q, {D}] with H_q a multiple of {H}, got {list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}"
            )
        if (k_local is None) != (v_local is None):
            raise ValueError("give both k_local and v_local, or neither")
        if (
            k_local is not None
            and v_local is not None
            and (k_local.dim() != 3 or k_local.shape[0] != H or k_local.shape[2] != D or k_local.shape != v_local.shape)
        ):
            raise ValueError(f"k_local and v_local must be [{H}, W, {D}], got {list(k_local.shape)} and {list(v_local.shape)}")
        dev = q.device
        if k_local is not None and v_local is not None and (k_local.device != dev or v_local.device != dev):
            raise ValueError(f"k_local and v_local must be on q's device ({dev}), got {k_local.device} and {v_local.device}")
        on_gpu = dev.type == "cuda"
        t0 = time.perf_counter()
        qf = q.float()[None]  # [1, H_q, D]
        o = torch.zeros(1, q.shape[0], D, device=dev)
        lse = torch.full((1, q.shape[0]), float("-inf"), device=dev)
        if ctx.num_blocks:
            nxt = (layer + 1) % spec.num_layers  # after the last layer: layer 0 of the next step
            if nxt != layer:
                self._prefetch(ctx, nxt)

            def wait() -> None:
                fut = ctx.pending.pop(layer, None)
                if fut is not None:
                    fut.result()

            # selection runs on the CPU, where the summaries are (one small copy of q from a GPU)
            ids = self.select(ctx, layer, q.detach().cpu() if on_gpu else q, budget, _before_level2=wait)
            wait()
            kv = self._gather(ctx, layer, ids)
            if on_gpu:
                kv = self._to_device(ctx, layer, ids, kv, dev)
            o, lse = sparse_decode(qf.to(kv.dtype), kv[None, :, 0], kv[None, :, 1], scale=scale)
            ctx.last_pages[layer] = ids
        if k_local is not None and v_local is not None and k_local.shape[1]:
            dt = self.compute_dtype if not on_gpu else self.spec.torch_dtype
            o2, lse2 = sparse_decode(qf.to(dt), k_local.to(dt)[None], v_local.to(dt)[None], scale=scale)
            o, lse = merge_states(o.float(), lse, o2.float(), lse2)
        with self._stats_lock:
            self._stats.steps += 1
            self._stats.seconds += time.perf_counter() - t0
        return o[0].float(), lse[0].float()

    def copy_stream(self, device: torch.device):
        """The CUDA stream that copies gathered pages to ``device`` (one per device, made on first use)."""
        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        stream = self._copy_streams.get(device)
        if stream is None:
            stream = self._copy_streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _to_device(self, ctx: TierContext, layer: int, ids: torch.Tensor, kv: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``kv`` (``_gather``'s host tensor of the pages ``ids``) on ``device``: copied from pinned
        host memory on the copy stream, which first waits for the compute stream's earlier work (the
        last step's attention may still read the device buffer); the compute stream then waits for
        the copy by an event, and the host thread goes on at once. When the layer's pages are those
        the device buffer already holds (the same pages in the same slots), nothing is copied."""
        kept = ctx.page_slots.get(layer)
        # the slot order of kv's pages: the kept slots' when _gather kept them, else the selection's
        rows = [list(r) for r in kept[0]] if kept is not None and kept[1].shape[2] * kept[1].shape[3] == kv.shape[2] else ids.tolist()
        slot = ctx.device_slots.get(layer)
        if slot is None or slot.dev.shape != kv.shape or slot.dev.dtype != kv.dtype or slot.dev.device != torch.device(device):
            if slot is not None:
                slot.done.synchronize()
            slot = _DeviceSlot(
                staging=torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True),
                dev=torch.empty(kv.shape, dtype=kv.dtype, device=device),
                done=torch.cuda.Event(),
            )
            ctx.device_slots[layer] = slot
        compute = torch.cuda.current_stream(device)
        if slot.rows != rows:
            slot.done.synchronize()  # the last copy out of the staging buffer has ended
            slot.staging.copy_(kv)
            stream = self.copy_stream(device)
            stream.wait_stream(compute)
            with torch.cuda.stream(stream):
                slot.dev.copy_(slot.staging, non_blocking=True)
                slot.done.record(stream)
            slot.rows = rows
            with self._stats_lock:
                self._stats.device_copies += 1
                self._stats.device_bytes_copied += kv.numel() * kv.element_size()
        compute.wait_event(slot.done)
        return slot.dev

    def _gather(self, ctx: TierContext, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """``[H_kv, 2, n * P, D]``: the K and V of the pages ``ids [H_kv, n]`` (page cache, then tiers).

        The context keeps the last step's gathered pages per layer (when every layer's fit in half
        the page cache's budget, in addition to it): a step copies in only the pages that joined
        the selection, into the slots of those that left it; kept pages count as page-cache hits."""
        H, D = self.spec.num_kv_heads, self.spec.head_dim
        rows = ids.tolist()
        n = len(rows[0])
        kept = ctx.page_slots.get(layer)
        reuse: list[tuple[list[int], list[int]]] | None = None
        if kept is not None and kept[1].shape[2] == n:
            old_rows, kv = kept
            reuse = []
            for row, old in zip(rows, old_rows):
                new, have = set(row), set(old)
                free = [c for c, g in enumerate(old) if g not in new]
                add = [g for g in row if g not in have]
                if len(free) != len(add) or len(new) != n:  # not a one-to-one swap: gather afresh
                    reuse = None
                    break
                reuse.append((free, add))
        if reuse is not None:
            pages = self._fetch(ctx, layer, [add for _, add in reuse])
            P = kv.shape[3]
            kept_pages = 0
            for h, ((free, add), row_pages) in enumerate(zip(reuse, pages)):
                old = old_rows[h]
                kept_pages += n - len(free)
                for c, g, t in zip(free, add, row_pages):
                    kv[h, :, c] = t
                    old[c] = g
            with self._stats_lock:
                self._stats.page_hits += kept_pages
        else:
            pages = self._fetch(ctx, layer, rows)
            P = pages[0][0].shape[1]
            kv = torch.empty(H, 2, n, P, D, dtype=pages[0][0].dtype)
            for h, row in enumerate(pages):
                torch.stack(row, 1, out=kv[h])  # [2, n, P, D]: one copy of the pages, no reshape after it
            if kv.numel() * kv.element_size() * self.spec.num_layers <= self.pages.max_bytes // 2:
                ctx.page_slots[layer] = ([list(r) for r in rows], kv)
            else:
                ctx.page_slots.pop(layer, None)
        with self._stats_lock:
            self._stats.pages_selected += ids.numel()
            self._stats.selected_bytes += ids.numel() * (ctx.first_layout.range_bytes if ctx.first_layout is not None else 0)
        return kv.view(H, 2, n * P, D)

    def prefill_layer(
        self,
        ctx: TierContext,
        layer: int,
        q: torch.Tensor,
        k_local: torch.Tensor,
        v_local: torch.Tensor,
        *,
        scale: float | None = None,
        budget: int | None = None,
        select_queries: int = 64,
        query_chunk: int = 256,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of a prefill chunk over the stored context plus the resident tokens (streamed
        prefill: see ``stream_prefill``).

        ``q [H_q, n, D]``: the chunk's queries; ``k_local, v_local [H_kv, W, D]``: the tokens after
        the stored blocks, the chunk's own ``n`` last (``W >= n``; query ``i`` sees the resident
        tokens up to its own position, causally). The stored context is attended through the same
        page selection as decode, once for the whole chunk: pages are scored (Quest bounds,
        hierarchically) by the chunk's last ``select_queries`` queries, as MInference estimates its
        vertical pattern from the last 64 queries, and every query of the chunk attends the
        ``budget`` selected tokens per KV head (block-sparse over the selected pages). Queries run
        ``query_chunk`` at a time, so memory is bounded by the chunk, the budget and the page cache.
        Returns ``(o [H_q, n, D] float32, lse [H_q, n] float32)``."""
        from kvtier.sparse_attn import merge_states

        spec = self.spec
        H, D = spec.num_kv_heads, spec.head_dim
        if not 0 <= layer < spec.num_layers:
            raise ValueError(f"layer must be in [0, {spec.num_layers}), got {layer}")
        if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[2] != D or q.shape[0] % H or not q.shape[1]:
            raise ValueError(f"q must be [H_q, n, {D}] with H_q a multiple of {H} and n >= 1, got {list(getattr(q, 'shape', []))}")
        n = q.shape[1]
        if (
            not isinstance(k_local, torch.Tensor)
            or not isinstance(v_local, torch.Tensor)
            or k_local.dim() != 3
            or k_local.shape[0] != H
            or k_local.shape[2] != D
            or k_local.shape != v_local.shape
            or k_local.shape[1] < n
        ):
            raise ValueError(
                f"k_local and v_local must be [{H}, W, {D}] with W >= n = {n} (the chunk's own tokens last), "
                f"got {list(getattr(k_local, 'shape', []))} and {list(getattr(v_local, 'shape', []))}"
            )
        for name, v in (("select_queries", select_queries), ("query_chunk", query_chunk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if q.device.type != "cpu" or k_local.device.type != "cpu" or v_local.device.type != "cpu":
            # a chunk on a GPU is attended on the CPU (the prefill has no device path), its result moved back
            o, lse = self.prefill_layer(
                ctx, layer, q.cpu(), k_local.cpu(), v_local.cpu(),
                scale=scale, budget=budget, select_queries=select_queries, query_chunk=query_chunk,
            )  # fmt: skip
            return o.to(q.device), lse.to(q.device)
        t0 = time.perf_counter()
        scale = D**-0.5 if scale is None else scale
        G, W = q.shape[0] // H, k_local.shape[1]
        dt = self.compute_dtype
        qf = q.to(dt).view(H, G, n, D)
        kv = None
        if ctx.num_blocks:
            sel = qf[:, :, -select_queries:].reshape(H * G * min(n, select_queries), D)  # [H, G*m, D] once viewed by select
            kv = self._gather(ctx, layer, self.select(ctx, layer, sel, budget))  # [H, 2, K, D]
        kl, vl = k_local.to(dt), v_local.to(dt)
        o = torch.empty(H, G, n, D)
        lse = torch.empty(H, G, n)
        for a in range(0, n, query_chunk):
            b = min(n, a + query_chunk)
            qb = qf[:, :, a:b]  # [H, G, m, D]
            # resident tokens, causal: query i of the chunk is resident token W - n + i
            s = torch.matmul(qb, kl.transpose(1, 2).unsqueeze(1)).float().mul_(scale)  # [H, G, m, W]
            pos = torch.arange(W - n + a, W - n + b).unsqueeze(1)
            s.masked_fill_(torch.arange(W) > pos, float("-inf"))
            l2 = torch.logsumexp(s, -1)
            o2 = torch.matmul(torch.exp_(s.sub_(l2.unsqueeze(-1))).to(dt), vl.unsqueeze(1)).float()
            if kv is not None:
                s1 = torch.matmul(qb, kv[:, 0].transpose(1, 2).unsqueeze(1)).float().mul_(scale)  # [H, G, m, K]
                l1 = torch.logsumexp(s1, -1)
                o1 = torch.matmul(torch.exp_(s1.sub_(l1.unsqueeze(-1))).to(kv.dtype), kv[:, 1].unsqueeze(1)).float()
                o2, l2 = merge_states(o1, l1, o2, l2)
            o[:, :, a:b], lse[:, :, a:b] = o2, l2
        with self._stats_lock:
            self._stats.prefill_chunks += 1
            self._stats.seconds += time.perf_counter() - t0
        return o.view(H * G, n, D), lse.view(H * G, n)

    def token_ids(self, ctx: TierContext, page_ids: torch.Tensor) -> torch.Tensor:
        """Token positions ``[H_kv, n * P]`` of the pages ``page_ids [H_kv, n]`` (for a resident
        comparison: the same selection over KV held in memory)."""
        P = ctx.first_layout.page_tokens if ctx.first_layout is not None else 16
        return (page_ids.unsqueeze(-1) * P + torch.arange(P)).flatten(1)


class StreamedPrefill:
    """Prefill of one sequence whose KV streams into the store: a prompt longer than memory.

    Feed the prompt chunk by chunk. For each chunk, call ``attend`` once per layer with the
    chunk's queries and its new keys and values (what the model's projections give), then
    ``commit``: every block that is complete and ends at least ``resident_tokens`` before the
    chunk's end is written to the store (``TieredStore.put``, ``parent`` chained) and released
    from memory. A chunk attends the stored context through ``TierAttention.prefill_layer``
    (page selection), so memory holds the resident tokens (at most ``resident_tokens`` plus a
    block plus a chunk per layer), the page cache and the hot summaries, whatever the prompt's
    length. Afterwards ``ctx`` is the open context for decoding (``TierAttention.decode_layer``)
    and ``k_local(layer)`` / ``v_local(layer)`` the resident tokens to pass it.

    Example::

        sp = StreamedPrefill(att)
        for chunk in chunks:                                    # e.g. 4,096 tokens each
            for layer in range(L):
                o, lse = sp.attend(layer, q[layer], k[layer], v[layer])   # [H_q, n, D]; [H_kv, n, D]
            sp.commit()

    ``block_keys(i)`` names block ``i`` of the sequence (default: random per sequence, as a
    private context; pass ``kvstore.chain_hashes`` of the token ids to share prefixes).

    ``trim_bytes``: once the commits have released this many bytes of KV since the last time,
    ``commit`` returns the C heap's free memory to the system (glibc's ``malloc_trim(0)``; a no-op
    elsewhere). Without it glibc keeps most freed chunk buffers and RSS creeps up with the prompt
    (measured: 1.23 GiB instead of about 0.6 GiB after 1M tokens). ``0``: after every commit that
    wrote blocks; ``None``: never. ``trims`` and ``trim_seconds`` count the calls and their cost.
    The resident tokens live in one buffer per layer (capacity: the resident tail, a block and a
    chunk), reused from chunk to chunk rather than reallocated.
    """

    def __init__(
        self,
        att: TierAttention,
        *,
        resident_tokens: int = 0,
        block_keys=None,
        budget: int | None = None,
        trim_bytes: int | None = 16 << 20,
    ) -> None:
        if isinstance(resident_tokens, bool) or not isinstance(resident_tokens, int) or resident_tokens < 0:
            raise ValueError(f"resident_tokens must be a non-negative int, got {resident_tokens!r}")
        if trim_bytes is not None and (isinstance(trim_bytes, bool) or not isinstance(trim_bytes, int) or trim_bytes < 0):
            raise ValueError(f"trim_bytes must be a non-negative int or None, got {trim_bytes!r}")
        import hashlib
        import os

        self.att = att
        self.resident_tokens = resident_tokens
        self.budget = budget
        nonce = os.urandom(16)
        self.block_keys = block_keys or (lambda i: hashlib.sha256(nonce + i.to_bytes(8, "little")).digest())
        self.ctx = att.open([])
        spec = att.spec
        empty = torch.empty(spec.num_kv_heads, 0, spec.head_dim, dtype=spec.torch_dtype)
        self._k = [empty] * spec.num_layers  # views of the buffers: the resident tokens
        self._v = [empty] * spec.num_layers
        self._kbuf: list[torch.Tensor | None] = [None] * spec.num_layers  # [H_kv, capacity, D] per layer
        self._vbuf: list[torch.Tensor | None] = [None] * spec.num_layers
        self.stored_tokens = 0
        self.num_tokens = 0  # tokens attended (committed chunks)
        self._chunk: int | None = None
        self.trim_bytes = trim_bytes
        self._released = 0  # bytes of KV released since the last trim
        self.trims = 0
        self.trim_seconds = 0.0

    def memory(self) -> dict:
        """Bytes held: ``TierAttention.memory(ctx)`` plus ``resident``, the resident tokens'
        buffers (their capacity)."""
        d = self.att.memory(self.ctx)
        d["resident"] = sum(b.numel() * b.element_size() for b in self._kbuf + self._vbuf if b is not None)
        return d

    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append the chunk's ``k, v`` to the layer's resident tokens, in place when the buffer has
        room (else a buffer of the capacity the resident tail, a block and this chunk need)."""
        W, n = self._k[layer].shape[1], k.shape[1]
        kb, vb = self._kbuf[layer], self._vbuf[layer]
        if kb is None or vb is None or kb.shape[1] < W + n:
            cap = max(W + n, self.resident_tokens + self.att.spec.block_tokens + n)
            kb = torch.empty(k.shape[0], cap, k.shape[2], dtype=self.att.spec.torch_dtype)
            vb = torch.empty_like(kb)
            kb[:, :W], vb[:, :W] = self._k[layer], self._v[layer]
            self._kbuf[layer], self._vbuf[layer] = kb, vb
        kb[:, W : W + n], vb[:, W : W + n] = k, v
        self._k[layer], self._v[layer] = kb[:, : W + n], vb[:, : W + n]

    def k_local(self, layer: int) -> torch.Tensor:
        return self._k[layer]

    def v_local(self, layer: int) -> torch.Tensor:
        return self._v[layer]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None):
        """The chunk's attention at ``layer``: ``q [H_q, n, D]``, its new ``k, v [H_kv, n, D]``.
        Returns ``(o [H_q, n, D], lse [H_q, n])`` (float32)."""
        spec = self.att.spec
        H, D = spec.num_kv_heads, spec.head_dim
        if (
            not isinstance(k, torch.Tensor)
            or not isinstance(v, torch.Tensor)
            or k.dim() != 3
            or k.shape != v.shape
            or k.shape[0] != H
            or k.shape[2] != D
        ):
            raise ValueError(f"k and v must be [{H}, n, {D}], got {list(getattr(k, 'shape', []))} and {list(getattr(v, 'shape', []))}")
        if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[1] != k.shape[1]:
            raise ValueError(f"q must be [H_q, n, {D}] with n = {k.shape[1]} (the chunk's tokens), got {list(getattr(q, 'shape', []))}")
        if self._chunk is not None and self._chunk != k.shape[1]:
            raise ValueError(f"every layer of a chunk has its {self._chunk} tokens; got {k.shape[1]} (commit() ends a chunk)")
        if self._k[layer].shape[1] != self.num_tokens - self.stored_tokens:
            raise ValueError(f"layer {layer} already attended this chunk; call commit() first")
        self._chunk = k.shape[1]
        self._append(layer, k, v)
        return self.att.prefill_layer(self.ctx, layer, q, self._k[layer], self._v[layer], scale=scale, budget=self.budget)

    def commit(self) -> int:
        """End the chunk: write the finished blocks to the store and release them; returns how
        many blocks were written. RuntimeError if the store refuses one (no room)."""
        spec = self.att.spec
        if self._chunk is None:
            return 0
        if any(k.shape[1] != self.num_tokens - self.stored_tokens + self._chunk for k in self._k):
            raise ValueError("commit() before every layer attended the chunk")
        self.num_tokens += self._chunk
        self._chunk = None
        BT = spec.block_tokens
        end = max(0, self.num_tokens - self.resident_tokens) // BT * BT
        n = (end - self.stored_tokens) // BT
        if n <= 0:
            return 0
        first = self.stored_tokens // BT
        m = n * BT
        kv = torch.stack([torch.stack([k[:, :m], v[:, :m]]) for k, v in zip(self._k, self._v)])  # [L, 2, H, m, D]
        blocks = kv.view(*kv.shape[:3], n, BT, kv.shape[-1]).permute(3, 0, 1, 2, 4, 5).contiguous()  # [n, L, 2, H, BT, D]
        keys = [self.block_keys(first + i) for i in range(n)]
        ok = self.att.store.put(spec, keys, blocks, parent=self.ctx.keys[-1] if self.ctx.keys else None)
        if not all(ok):
            raise RuntimeError(f"the store refused {ok.count(False)} of {n} blocks: no room in any tier")
        self.att.extend(self.ctx, keys)
        del kv, blocks
        for layer in range(spec.num_layers):  # released: only the resident tail stays, moved to the buffer's front
            for views, bufs in ((self._k, self._kbuf), (self._v, self._vbuf)):
                rest, buf = views[layer][:, m:], bufs[layer]
                assert buf is not None
                r = rest.shape[1]
                if r:
                    buf[:, :r] = rest.clone() if r > m else rest  # overlapping ranges: through a copy
                views[layer] = buf[:, :r]
        self.stored_tokens = end
        self._released += n * spec.block_nbytes
        if self.trim_bytes is not None and self._released >= self.trim_bytes:
            t0 = time.perf_counter()
            if malloc_trim():
                self.trims += 1
            self.trim_seconds += time.perf_counter() - t0
            self._released = 0
        return n
