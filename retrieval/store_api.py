"""Store-level retrieval: the top pages of a sequence for a query, across every tier, fetching only what holds them.

``StoreRetriever`` sits next to a ``kvstore.TieredStore``:

- ``put(spec, keys, blocks)`` stores a chain and computes each stored block's summaries (Quest
  bounds and mean key per 16-token page, layer and KV head) into a bounded ``SummaryStore`` in
  host memory; they stay there whichever tier the block is demoted to.
- ``retrieve(spec, keys, q, budget)`` scores every page of the cached prefix of the chain from
  the summaries alone (no block read), keeps the sinks, the recent window and the best pages per
  (layer, KV head) within ``budget`` tokens, then fetches from the store only the blocks that
  hold a selected token (one batched ``get``, from whichever tier holds each) and gathers the
  selected keys and values.

A block whose summary is not in host memory (dropped by the LRU bound, or written by another
instance to a shared tier) is fetched once to be summarized; ``RetrievalResult.summarized``
counts those reads.

Example::

    r = StoreRetriever(store)
    r.put(spec, keys, blocks)
    res = r.retrieve(spec, keys, q, budget=256)      # q [L, H_q, D]
    o, lse = sparse_attention(q, res.k, res.v, res.valid)   # what sparse_decode does over the ids
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kvtier.checks import check_int
from kvtier.kvstore.keys import BlockHash, check_keys
from kvtier.kvstore.spec import KVSpec
from kvtier.kvstore.store import TieredStore

from .selectors import choose_pages, mask_to_ids
from .summaries import SummaryStore, quest_scores


@dataclass(frozen=True)
class RetrievalResult:
    """What ``retrieve`` found, per requested layer and KV head."""

    layers: list[int]  # the layers of the query, in order
    token_ids: torch.Tensor  # [L_q, H_kv, budget] int64 positions in the sequence, ascending, -1 padding
    k: torch.Tensor  # [L_q, H_kv, budget, D] the selected keys (zeros at padding)
    v: torch.Tensor  # [L_q, H_kv, budget, D] the selected values (zeros at padding)
    num_tokens: int  # tokens of the cached prefix searched (T)
    num_blocks: int  # blocks of the cached prefix
    fetched: list[BlockHash]  # blocks read from the store to gather the selection
    summarized: int  # blocks read only because their summary was not in host memory
    page_tokens: int = 16

    @property
    def valid(self) -> torch.Tensor:
        return self.token_ids >= 0

    @property
    def page_ids(self) -> list[list[list[int]]]:
        """Per layer and KV head, the distinct pages the selection touches."""
        P = self.page_tokens
        return [[sorted({int(t) // P for t in row if t >= 0}) for row in lay] for lay in self.token_ids.tolist()]


class StoreRetriever:
    def __init__(self, store: TieredStore, summaries: SummaryStore | None = None, num_sink: int = 4, num_recent: int = 32) -> None:
        if not isinstance(store, TieredStore):
            raise ValueError(f"store must be a kvstore.TieredStore, got {type(store).__name__}")
        check_int("num_sink", num_sink, low=0)
        check_int("num_recent", num_recent, low=0)
        self.store = store
        self.summaries = summaries if summaries is not None else SummaryStore()
        self.num_sink = num_sink
        self.num_recent = num_recent
        self._last_event = store.last_event_id

    # -- writing ---------------------------------------------------------------------------
    def put(self, spec: KVSpec, keys: Sequence[bytes], blocks, **options) -> list[bool]:
        """``TieredStore.put`` plus the summaries of every block now cached."""
        if isinstance(blocks, torch.Tensor) and blocks.dim() == len(spec.block_shape) + 1:
            blocks = list(blocks.unbind(0))
        stored = self.store.put(spec, keys, blocks, **options)
        for key, block, ok in zip(check_keys(keys), blocks, stored):
            if ok and key not in self.summaries:
                self.summaries.add(key, block)
        return stored

    def sync(self, max_events: int = 100_000) -> int:
        """Drop the summaries of blocks the store no longer holds in any tier (from its event stream).

        Returns how many were dropped. Blocks that only moved between tiers keep their summary.
        (The LRU bound holds regardless; this frees the room early.)
        """
        dropped = 0
        seen = 0
        while seen < max_events:
            events = self.store.events(after=self._last_event, limit=1000)
            if not events:
                break
            for ev in events:
                self._last_event = ev.id
                if ev.kind == "removed":
                    slot = self.store.index.slot(ev.key)
                    if slot is None or self.store.index.residency(slot) == 0:
                        dropped += self.summaries.discard([ev.key])
            seen += len(events)
        return dropped

    # -- reading ---------------------------------------------------------------------------
    def _check_query(self, spec: KVSpec, q: torch.Tensor, layers) -> list[int]:
        if layers is None:
            layers = list(range(spec.num_layers))
        layers = [int(x) for x in layers]
        if not layers or any(not 0 <= x < spec.num_layers for x in layers):
            raise ValueError(f"layers must be a non-empty list of layer ids in [0, {spec.num_layers}), got {layers}")
        if not isinstance(q, torch.Tensor) or q.dim() != 3:
            raise ValueError(f"q must be a tensor [L, H_q, D], got {list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
        L, H_q, D = q.shape
        if L != len(layers) or D != spec.head_dim or H_q % spec.num_kv_heads:
            raise ValueError(
                f"q must be [{len(layers)}, a multiple of {spec.num_kv_heads}, {spec.head_dim}] "
                f"(layers, query heads, head_dim), got {list(q.shape)}"
            )
        return layers

    def retrieve(
        self,
        spec: KVSpec,
        keys: Sequence[bytes],
        q: torch.Tensor,
        budget: int,
        *,
        layers: Sequence[int] | None = None,
    ) -> RetrievalResult:
        """Top pages of the cached prefix of ``keys`` for ``q [L_q, H_q, D]`` (one decode query per layer).

        ``budget``: tokens per (layer, KV head), sinks and recent window included. Pages are
        chosen by their Quest upper bound (maximum over the KV head's query heads).
        """
        layers = self._check_query(spec, q, layers)
        keys = check_keys(keys)
        check_int("budget", budget, low=1)
        if budget < self.num_sink + self.num_recent:
            raise ValueError(f"budget must be at least num_sink + num_recent = {self.num_sink + self.num_recent}, got {budget}")
        cached = self.store.lookup(spec, keys)
        assert cached is not None  # lookup waits for the lock unless told not to
        keys = keys[: cached.num_blocks]
        BT, P, H_kv, D = spec.block_tokens, self.summaries.page_tokens, spec.num_kv_heads, spec.head_dim
        T = len(keys) * BT
        L_q = len(layers)
        if T == 0:
            empty = torch.full((L_q, H_kv, budget), -1, dtype=torch.int64)
            z = torch.zeros(L_q, H_kv, budget, D, dtype=spec.torch_dtype)
            return RetrievalResult(layers, empty, z, z.clone(), 0, 0, [], 0, self.summaries.page_tokens)

        # 1. summaries of every block, from host memory (a miss reads the block once)
        summaries = [self.summaries.get(k) for k in keys]
        missing = [i for i, s in enumerate(summaries) if s is None]
        held: dict[int, torch.Tensor] = {}
        if missing:
            got = self.store.get(spec, [keys[i] for i in missing])
            for i, block in zip(missing, got):
                if block is None:  # vanished between lookup and get: search the prefix before it
                    keys, T = keys[:i], i * BT
                    break
                held[i] = block
                summaries[i] = self.summaries.add(keys[i], block)
            summaries = summaries[: len(keys)]
        n_blocks = len(keys)
        if T == 0:
            return self.retrieve(spec, [], q, budget, layers=layers)
        li = torch.tensor(layers)
        found = [s for s in summaries if s is not None]
        assert len(found) == len(summaries)  # each block kept before the first vanished one has its summary
        kmin = torch.cat([s.kmin[li] for s in found], 2)  # [L_q, H_kv, Np, D]
        kmax = torch.cat([s.kmax[li] for s in found], 2)

        # 2. page scores and the choice of pages (sinks and window always kept)
        G = q.shape[1] // H_kv
        scores = quest_scores(q.float().view(L_q, H_kv, G, D), kmin, kmax).amax(2)  # [L_q, H_kv, Np]
        reserved = torch.zeros(T, dtype=torch.bool)
        reserved[: min(self.num_sink, T)] = True
        if self.num_recent:
            reserved[max(0, T - self.num_recent) :] = True
        if T <= budget:
            mask = torch.ones(L_q, H_kv, T, dtype=torch.bool)
        else:
            mask = choose_pages(scores, reserved, P, budget - int(reserved.sum())) | reserved
        token_ids = mask_to_ids(mask, budget)  # [L_q, H_kv, budget]

        # 3. fetch only the blocks holding a selected token, then gather
        need = sorted(set((token_ids[token_ids >= 0] // BT).unique().tolist()))
        fetch = [b for b in need if b not in held]
        got = self.store.get(spec, [keys[b] for b in fetch]) if fetch else []
        for b, block in zip(fetch, got):
            if block is None:
                raise RuntimeError(f"block {b} of the chain vanished from the store during retrieval")
            held[b] = block
        k_out = torch.zeros(L_q, H_kv, budget, D, dtype=spec.torch_dtype)
        v_out = torch.zeros_like(k_out)
        valid = token_ids >= 0
        tok = token_ids.clamp_min(0)
        blk, off = tok // BT, tok % BT
        heads = torch.arange(H_kv).view(1, -1, 1).expand_as(tok)
        lays = li.view(-1, 1, 1).expand_as(tok)
        for b in need:
            sel = valid & (blk == b)
            block = held[b]  # [L, 2, H_kv, BT, D]
            k_out[sel] = block[lays[sel], 0, heads[sel], off[sel]].to(k_out.device)  # a device tier's block may be on CUDA
            v_out[sel] = block[lays[sel], 1, heads[sel], off[sel]].to(v_out.device)
        return RetrievalResult(layers, token_ids, k_out, v_out, T, n_blocks, [keys[b] for b in need], len(missing), P)
