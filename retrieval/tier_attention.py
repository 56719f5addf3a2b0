"""Decode attention over a context whose KV stays in the store's tiers, reading only the pages each
KV head selects.

``TierAttention`` is the one entry point (used by ``SparseDecode(store=...)`` in the transformers
connector, by the service's ``/v1/attention`` and by ``bench/tier_attention.py``). Per decode step
and layer (``decode_layer``):

1. **Select, hierarchically, from summaries only.** Level 1 scores every block of the context by
   its block-level Quest bound (``bmin, bmax [H_kv, D]`` per block and layer, kept in memory for
   the open context) and keeps the ``candidate_blocks`` best blocks per KV head; level 2 scores the
   pages of those blocks only (page bounds ``kmin, kmax [H_kv, Np, D]``, from a hot LRU of
   ``summary_bytes``, else one verified range read of the layer's summary section) and keeps the
   best ``budget / P`` pages per KV head (the first page of the context, the attention sink,
   always). Level 2's work is bounded by ``candidate_blocks`` whatever the context length; level 1
   is one small matrix product per 256 tokens.
2. **Read exactly those pages** through a bounded page cache (hits counted across steps): the
   misses, grouped per block and coalesced into runs, in one ``TieredStore.read_pieces`` call
   (host: views; disk: ``pread``; Redis: pipelined ``GETRANGE``), each range verified.
3. **Prefetch** layer ``l+1``'s page summaries and pages of the previous step on a thread while
   layer ``l`` selects, reads and attends (after the last layer: layer 0 of the next step); the
   selections of consecutive steps overlap heavily.
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

import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from kvtier.kvstore.keys import check_keys
from kvtier.kvstore.pages import PageLayout, Summary, coalesce
from kvtier.kvstore.spec import KVSpec
from kvtier.kvstore.store import TieredStore


@dataclass
class TierAttentionStats:
    steps: int = 0  # decode_layer calls
    pages_selected: int = 0  # (head, page) pairs attended from the tiers
    page_hits: int = 0  # of which found in the page cache
    page_misses: int = 0  # of which read from a tier (by the step itself or by a prefetch)
    prefetched: int = 0  # pages read ahead by the prefetch thread
    selected_bytes: int = 0  # the physical minimum: stored bytes of the selected pages
    page_bytes_read: dict = field(default_factory=dict)  # tier -> payload bytes of pages read
    summary_bytes_read: dict = field(default_factory=dict)  # tier -> bytes of page summaries read
    reads: dict = field(default_factory=dict)  # tier -> spans read
    blocks_scored: int = 0  # level 1: blocks scored (summed over steps)
    pages_scored: int = 0  # level 2: pages scored (summed over steps, per KV head)
    mismatches: int = 0  # pieces that failed their checksum (re-read from the next tier)
    seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        n = self.page_hits + self.page_misses
        return self.page_hits / n if n else 0.0

    @property
    def bytes_read(self) -> int:
        return sum(self.page_bytes_read.values()) + sum(self.summary_bytes_read.values())

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

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class TierContext:
    """One open sequence: its stored blocks, their layouts and block-level bounds."""

    keys: list[bytes]
    layouts: list[PageLayout]
    bounds: torch.Tensor  # [L, H_kv, 2D, N] float32: block-level key maximum then minimum, per layer
    last_pages: dict = field(default_factory=dict)  # layer -> [H_kv, n] int64 global page ids of the last step
    last_blocks: dict = field(default_factory=dict)  # layer -> blocks level 1 kept at the last step
    pending: dict = field(default_factory=dict)  # layer -> Future of its prefetch

    @property
    def num_blocks(self) -> int:
        return len(self.keys)


class TierAttention:
    """Decode attention over KV stored in a ``TieredStore`` (see the module docstring).

    Args:
        store, spec: where the blocks are and what they are.
        budget: tokens per KV head attended from the stored context (whole pages; the sink page
            included). A context of at most ``budget`` tokens is attended in full.
        candidate_blocks: blocks per KV head kept by level 1 (``None``: every block, one level).
        page_cache_bytes: the page cache (decoded pages of every open context, LRU).
        summary_bytes: the hot page summaries (kmin, kmax per block and layer, LRU).
        prefetch: read layer l+1's previous pages on a thread while layer l runs.
    """

    def __init__(
        self,
        store: TieredStore,
        spec: KVSpec,
        *,
        budget: int = 512,
        candidate_blocks: int | None = 32,
        page_cache_bytes: int = 256 << 20,
        summary_bytes: int = 256 << 20,
        prefetch: bool = True,
    ) -> None:
        if not isinstance(store, TieredStore):
            raise ValueError(f"store must be a kvstore.TieredStore, got {type(store).__name__}")
        for name, v, low in (("budget", budget, 1), ("page_cache_bytes", page_cache_bytes, 0), ("summary_bytes", summary_bytes, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if candidate_blocks is not None and (
            isinstance(candidate_blocks, bool) or not isinstance(candidate_blocks, int) or candidate_blocks < 1
        ):
            raise ValueError(f"candidate_blocks must be a positive int or None, got {candidate_blocks!r}")
        self.store, self.spec = store, spec
        self.budget = budget
        self.candidate_blocks = candidate_blocks
        self.prefetch = prefetch
        # pages are decoded once into the dtype attention computes in: float32 on CPU (no fast
        # float16 arithmetic there), the spec's dtype on a GPU
        self.compute_dtype = torch.float32 if not torch.cuda.is_available() else spec.torch_dtype
        self.pages = _LRU(page_cache_bytes)
        self.summaries = _LRU(summary_bytes)
        self._stats = TierAttentionStats()
        self._stats_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-prefetch") if prefetch else None

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
                    "reads": dict(s.reads),
                }
            )

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats = TierAttentionStats()

    def _count(self, res, summary: bool) -> None:
        with self._stats_lock:
            s = self._stats
            target = s.summary_bytes_read if summary else s.page_bytes_read
            for t, n in res.bytes_by_tier.items():
                target[t] = target.get(t, 0) + n
            for t, n in res.reads_by_tier.items():
                s.reads[t] = s.reads.get(t, 0) + n
            s.mismatches += res.mismatches

    # -- contexts --------------------------------------------------------------------------
    def open(self, keys: Sequence[bytes]) -> TierContext:
        """The context of a chain of stored blocks: their layouts and block-level bounds (read
        once: one verified range read per block). ValueError if a block is not stored paged."""
        keys = check_keys(keys)
        spec = self.spec
        layouts = self.store.page_layouts(spec, keys) if keys else []
        missing = [i for i, lay in enumerate(layouts) if lay is None]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(keys)} blocks (first: position {missing[0]}) are not stored with a "
                "page-addressable codec ('paged', 'paged_int8') in a tier that serves ranges"
            )
        L, H, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
        # laid out for level 1's one matrix product per layer: [q+, q-] [H, G, 2D] @ [H, 2D, N]
        bounds = torch.empty(L, H, 2 * D, len(keys))
        if keys:
            res = self._read(layouts, [[Summary(L)]] * len(keys), summary=True)
            for i, (lay, bufs) in enumerate(zip(layouts, res)):
                lo, hi = lay.decode_summary(L, bufs[0])  # [L, H, D]
                bounds[:, :, :D, i], bounds[:, :, D:, i] = hi.float(), lo.float()
        return TierContext(list(keys), layouts, bounds)

    def extend(self, ctx: TierContext, keys: Sequence[bytes]) -> None:
        """Append newly stored blocks (the chain's next ones) to an open context."""
        more = self.open(keys)
        ctx.keys += more.keys
        ctx.layouts += more.layouts
        ctx.bounds = torch.cat([ctx.bounds, more.bounds], 3)
        ctx.last_pages.clear()
        ctx.last_blocks.clear()  # page ids of the last step stay valid, but the prefetch may skip new blocks: start over

    def _read(self, layouts: list[PageLayout], pieces: list[list], *, summary: bool) -> list[list[memoryview]]:
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
    def _page_bounds(self, ctx: TierContext, layer: int, blocks: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{block: (kmin, kmax) [H_kv, Np, D]}`` of ``layer``, from the hot LRU or one read."""
        out, miss = {}, []
        for b in blocks:
            v = self.summaries.get_value((ctx.keys[b], layer))
            if v is None:
                miss.append(b)
            else:
                out[b] = v
        if miss:
            bufs = self._read([ctx.layouts[b] for b in miss], [[Summary(layer)]] * len(miss), summary=True)
            for b, piece in zip(miss, bufs):
                kmin, kmax, _ = ctx.layouts[b].decode_summary(layer, piece[0])
                out[b] = (kmin, kmax)  # as stored (float16 for float16 blocks)
                self.summaries.put((ctx.keys[b], layer), out[b], 2 * kmin.numel() * kmin.element_size())
        return out

    def select(self, ctx: TierContext, layer: int, q: torch.Tensor, budget: int | None = None, *, _before_level2=None) -> torch.Tensor:
        """Global page ids ``[H_kv, n]`` (``block * Np + page``, ascending) each KV head attends for
        the decode query ``q [H_q, D]`` of ``layer`` (``budget``: this call's, default the instance's)."""
        spec = self.spec
        H, D, N = spec.num_kv_heads, spec.head_dim, ctx.num_blocks
        Np = spec.block_tokens // ctx.layouts[0].page_tokens if N else 1
        P = spec.block_tokens // Np
        total = N * Np
        want = min(total, max(1, (self.budget if budget is None else budget) // P))
        if want >= total:
            return torch.arange(total).expand(H, total)
        qf = q.float().view(H, -1, D)  # [H, G, D]
        pos, neg = qf.clamp_min(0), qf.clamp_max(0)
        # level 1: blocks by their block-level bound
        C = N if self.candidate_blocks is None else min(N, max(self.candidate_blocks, -(-want // Np)))
        if C < N:
            s1 = torch.bmm(torch.cat([pos, neg], 2), ctx.bounds[layer]).amax(1)  # [H, N]
            s1[:, 0] = float("inf")  # the sink's block
            cand = s1.topk(C, dim=1).indices  # [H, C]
        else:
            cand = torch.arange(N).expand(H, N)
        union = sorted(set(cand.flatten().tolist()))
        if _before_level2 is not None:
            _before_level2()  # a prefetch of this layer's summaries and pages ends here
        bounds = self._page_bounds(ctx, layer, union)
        ctx.last_blocks[layer] = union
        pairs = [(b, h) for h, row in enumerate(cand.tolist()) for b in row]
        kmin_c = torch.stack([bounds[b][0][h] for b, h in pairs]).view(H, C * Np, D).float()  # [H, C*Np, D]
        kmax_c = torch.stack([bounds[b][1][h] for b, h in pairs]).view(H, C * Np, D).float()
        s2 = torch.baddbmm(neg @ kmin_c.transpose(1, 2), pos, kmax_c.transpose(1, 2)).amax(1)  # [H, C*Np]
        gid = (cand.unsqueeze(-1) * Np + torch.arange(Np)).reshape(H, C * Np)  # global page ids
        s2 = torch.where(gid == 0, float("inf"), s2)  # the sink page
        top = s2.topk(min(want, C * Np), dim=1).indices
        with self._stats_lock:
            self._stats.blocks_scored += N if C < N else 0
            self._stats.pages_scored += C * Np
        return torch.gather(gid, 1, top).sort(1).values

    # -- reading ---------------------------------------------------------------------------
    def _fetch(self, ctx: TierContext, layer: int, page_ids: torch.Tensor, *, prefetch: bool = False) -> list[list[torch.Tensor]]:
        """Per KV head, the ``[2, P, D]`` page tensors of ``page_ids [H_kv, n]`` (cache, then tiers)."""
        Np = self.spec.block_tokens // ctx.layouts[0].page_tokens
        rows = page_ids.tolist()
        got: list[list] = [[None] * len(r) for r in rows]
        need: dict[int, dict[int, list[tuple[int, int]]]] = {}  # block -> range id -> [(head, slot)]
        hits = 0
        for h, row in enumerate(rows):
            for j, g in enumerate(row):
                b, p = divmod(g, Np)
                rid = ctx.layouts[b].range_id(layer, h, p)
                t = self.pages.get_value((ctx.keys[b], rid))
                if t is None:
                    need.setdefault(b, {}).setdefault(rid, []).append((h, j))
                else:
                    got[h][j] = t
                    hits += 1
        misses = sum(len(v) for d in need.values() for v in d.values())
        if need:
            blocks = sorted(need)
            runs = [coalesce(list(need[b])) for b in blocks]
            bufs = self._read([ctx.layouts[b] for b in blocks], runs, summary=False)
            for b, b_runs, b_bufs in zip(blocks, runs, bufs):
                lay = ctx.layouts[b]
                for run, buf in zip(b_runs, b_bufs):
                    pages = lay.decode_pages(buf, run.num, self.compute_dtype)  # [num, 2, P, D]
                    for i in range(run.num):
                        rid = run.first + i
                        t = pages[i]
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

    def _prefetch(self, ctx: TierContext, layer: int) -> None:
        """Read ahead, on the thread, the page summaries and pages ``layer`` used at the last step."""
        ids = ctx.last_pages.get(layer)
        if self._pool is None or ids is None or layer in ctx.pending:
            return
        blocks = ctx.last_blocks.get(layer)

        def work() -> None:
            if blocks:
                self._page_bounds(ctx, layer, blocks)
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
        t0 = time.perf_counter()
        qf = q.float()[None]  # [1, H_q, D]
        o = torch.zeros(1, q.shape[0], D)
        lse = torch.full((1, q.shape[0]), float("-inf"))
        if ctx.num_blocks:
            nxt = (layer + 1) % spec.num_layers  # after the last layer: layer 0 of the next step
            if nxt != layer:
                self._prefetch(ctx, nxt)

            def wait() -> None:
                fut = ctx.pending.pop(layer, None)
                if fut is not None:
                    fut.result()

            ids = self.select(ctx, layer, q, budget, _before_level2=wait)
            wait()
            pages = self._fetch(ctx, layer, ids)
            kv = torch.stack([t for row in pages for t in row])  # [H*n, 2, P, D]
            n, P = len(pages[0]), kv.shape[2]
            kv = kv.view(H, n, 2, P, D).transpose(1, 2).reshape(H, 2, n * P, D)
            o, lse = sparse_decode(qf.to(kv.dtype), kv[None, :, 0], kv[None, :, 1], scale=scale)
            ctx.last_pages[layer] = ids
            with self._stats_lock:
                self._stats.pages_selected += ids.numel()
                self._stats.selected_bytes += ids.numel() * ctx.layouts[0].range_bytes
        if k_local is not None and v_local is not None and k_local.shape[1]:
            dt = self.compute_dtype
            o2, lse2 = sparse_decode(qf.to(dt), k_local.to(dt)[None], v_local.to(dt)[None], scale=scale)
            o, lse = merge_states(o.float(), lse, o2.float(), lse2)
        with self._stats_lock:
            self._stats.steps += 1
            self._stats.seconds += time.perf_counter() - t0
        return o[0].float(), lse[0].float()

    def token_ids(self, ctx: TierContext, page_ids: torch.Tensor) -> torch.Tensor:
        """Token positions ``[H_kv, n * P]`` of the pages ``page_ids [H_kv, n]`` (for a resident
        comparison: the same selection over KV held in memory)."""
        P = ctx.layouts[0].page_tokens if ctx.layouts else 16
        return (page_ids.unsqueeze(-1) * P + torch.arange(P)).flatten(1)
