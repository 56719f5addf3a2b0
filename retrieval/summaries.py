"""Page summaries of stored blocks: Quest bounds and a representative key, in bounded host memory.

For every page of ``P`` (default 16) consecutive tokens, every layer and every KV head, a block's
summary holds the channel-wise minimum and maximum of the page's keys (Quest's bounds: for any
query ``q``, ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` is an upper bound of ``q . k`` for every
key ``k`` of the page) and the page's mean key (its representative, as in InfLLM / ArkVale).

Summaries are small (3 vectors per 16 keys: 3/32 of the keys' bytes in float16, 1/64 of a
block's K+V) and live in host memory keyed by the block's hash, whatever tier holds the block,
so that a selection can decide which blocks to fetch before fetching any. ``SummaryStore`` is an
LRU bounded in bytes: nothing grows without limit, and a summary that was dropped is recomputed
from the block when it is next needed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from kvtier.checks import check_int

PAGE_TOKENS = 16


@dataclass(frozen=True)
class BlockSummary:
    """Per page and KV head summaries of one block, each ``[L, H_kv, N_pages, D]``."""

    kmin: torch.Tensor  # [L, H_kv, N_pages, D]
    kmax: torch.Tensor  # [L, H_kv, N_pages, D]
    kmean: torch.Tensor  # [L, H_kv, N_pages, D]
    page_tokens: int

    @property
    def num_pages(self) -> int:
        return self.kmin.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kmin, self.kmax, self.kmean))


def _check_page_tokens(page_tokens: int, num_tokens: int) -> None:
    check_int("page_tokens", page_tokens, low=1)
    if num_tokens % page_tokens:
        raise ValueError(f"the token count must be a multiple of page_tokens={page_tokens}, got {num_tokens}")


def page_bounds(k: torch.Tensor, page_tokens: int = PAGE_TOKENS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kmin, kmax, kmean)``, each ``[..., T // P, D]``, of keys ``k [..., T, D]`` (T a multiple of P).

    Computed in float32; a trailing partial page is the caller's to handle (pad or drop).
    """
    if not isinstance(k, torch.Tensor) or k.dim() < 2:
        raise ValueError(f"keys must be a tensor [..., T, D], got {type(k).__name__ if not isinstance(k, torch.Tensor) else list(k.shape)}")
    T, D = k.shape[-2], k.shape[-1]
    _check_page_tokens(page_tokens, T)
    pages = k.float().reshape(*k.shape[:-2], T // page_tokens, page_tokens, D)  # [..., N_pages, P, D]
    return pages.amin(-2), pages.amax(-2), pages.mean(-2)


_SCRATCH = threading.local()
_SCRATCH_BYTES = 8 << 20  # the most float32 scratch a thread keeps for summaries


def _scratch(numel: int) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` elements kept per thread (reused across blocks; at most
    ``_SCRATCH_BYTES``, or one layer's keys where a layer is larger)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def summarize_block(block: torch.Tensor, page_tokens: int = PAGE_TOKENS, dtype: torch.dtype = torch.float16) -> BlockSummary:
    """Summaries of one block in the store's layout ``[L, 2, H_kv, T, D]`` (only the keys are read).

    ``dtype`` is the storage precision of the summary. The bounds are rounded outward (min down,
    max up) when narrowed, so a page score stays an upper bound after the cast.
    """
    if not isinstance(block, torch.Tensor) or block.dim() != 5 or block.shape[1] != 2:
        got = list(block.shape) if isinstance(block, torch.Tensor) else type(block).__name__
        raise ValueError(f"a block must be [L, 2, H_kv, T, D], got {got}")
    if block.dtype == dtype and dtype != torch.float32 and block.device.type == "cpu":
        # the keys are already in the summary's precision, so their minimum and maximum are exact
        # without rounding; one layer at a time in float32, so the temporaries stay small (a float32
        # copy of a 6 MiB block's keys is 6 MiB of fresh memory, whose page faults dominated a put)
        L, _, H, T, D = block.shape
        _check_page_tokens(page_tokens, T)
        N = T // page_tokens
        # the keys are widened once into a float32 scratch this thread keeps (no fresh pages per block),
        # then reduced over each page's tokens there: float32 reductions are 4-5x faster than float16 ones
        # on a CPU without float16 arithmetic. The minimum and maximum of float16 values are float16
        # values, so narrowing them back is exact; the mean is rounded once. Alternating with the float16
        # reductions over 6 MiB blocks: p10 1.46 ms against 2.01 ms, p50 2.01 against 2.11 (docs/data-path.md).
        # Layers go through the scratch a group at a time, at most _SCRATCH_BYTES of it: a thread's scratch stays
        # bounded whatever the block's size (a 6 MiB block's keys fit in one group).
        per = max(1, _SCRATCH_BYTES // (H * T * D * 4))
        out = torch.empty(3, L, H, N, D, dtype=dtype)  # kmin, kmax, kmean
        for l0 in range(0, L, per):
            n = min(per, L - l0)
            scratch = _scratch(n * H * T * D)
            scratch.view(n, H, T, D).copy_(block[l0 : l0 + n, 0])
            pages = scratch.view(n * H * N, page_tokens, D)
            flat = out[:, l0 : l0 + n].reshape(3, n * H * N, D)  # a view: out is contiguous in its layers
            flat[0].copy_(pages.amin(1))
            flat[1].copy_(pages.amax(1))
            flat[2].copy_(pages.mean(1))
        kmin, kmax, kmean = out
        return BlockSummary(kmin, kmax, kmean, page_tokens)
    kmin, kmax, kmean = page_bounds(block[:, 0], page_tokens)  # [L, H_kv, N_pages, D]
    if dtype != torch.float32:
        kmin = _round_down(kmin, dtype)
        kmax = _round_up(kmax, dtype)
        kmean = kmean.to(dtype)
    # host memory whatever device the block came from (a CUDA device tier's block)
    return BlockSummary(kmin.contiguous().cpu(), kmax.contiguous().cpu(), kmean.contiguous().cpu(), page_tokens)


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    low = y.float() > x
    if low.any():
        y = torch.where(low, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)
    return y


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    high = y.float() < x
    if high.any():
        y = torch.where(high, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest page upper bounds: ``q [..., G, D]`` against ``kmin, kmax [..., N_pages, D]`` -> ``[..., G, N_pages]``.

    ``score[g, p] = sum_d max(q[g, d] * kmin[p, d], q[g, d] * kmax[p, d]) >= q[g] . k`` for every
    key ``k`` of page ``p`` (in exact arithmetic; float32 here). Memory is O(G * N_pages) : the
    positive and negative parts of ``q`` are two matrix products.
    """
    qf = q.float()
    pos, neg = qf.clamp_min(0), qf.clamp_max(0)
    return pos @ kmax.float().transpose(-1, -2) + neg @ kmin.float().transpose(-1, -2)


class SummaryStore:
    """Block summaries keyed by block hash, LRU-bounded to ``max_bytes`` of host memory.

    Thread-safe. ``get`` returns ``None`` for a summary it does not hold (never built, or
    dropped to stay under the bound): the caller recomputes it from the block.
    """

    def __init__(self, max_bytes: int = 256 << 20, page_tokens: int = PAGE_TOKENS, dtype: torch.dtype = torch.float16) -> None:
        check_int("max_bytes", max_bytes, low=1)
        _check_page_tokens(page_tokens, page_tokens)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        self.max_bytes = max_bytes
        self.page_tokens = page_tokens
        self.dtype = dtype
        self._items: OrderedDict[bytes, BlockSummary] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.computed = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def add(self, key: bytes, block: torch.Tensor) -> BlockSummary:
        """Summarize ``block`` ``[L, 2, H_kv, T, D]`` and keep it under ``key`` (replacing any)."""
        return self.keep(key, summarize_block(block, self.page_tokens, self.dtype))

    def keep(self, key: bytes, summary: BlockSummary) -> BlockSummary:
        """``put`` a summary this store's owner just computed (counted in ``computed``)."""
        self.put(key, summary)
        self.computed += 1
        return summary

    def add_many(self, keys: Sequence[bytes], blocks: Iterable[torch.Tensor]) -> None:
        for key, block in zip(keys, blocks):
            self.add(key, block)

    def put(self, key: bytes, summary: BlockSummary) -> None:
        if not isinstance(key, (bytes, bytearray)):
            raise ValueError(f"a summary key must be bytes (a BlockHash), got {type(key).__name__}")
        if summary.page_tokens != self.page_tokens:
            raise ValueError(f"summary pages must have {self.page_tokens} tokens, got {summary.page_tokens}")
        key = bytes(key)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if summary.nbytes > self.max_bytes:
                return  # larger than the whole budget: not kept (recomputed on demand)
            self._items[key] = summary
            self._bytes += summary.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes
                self.dropped += 1

    def get(self, key: bytes) -> BlockSummary | None:
        """The summary of ``key`` (marks it recently used) or ``None``."""
        with self._lock:
            s = self._items.get(bytes(key))
            if s is None:
                self.misses += 1
                return None
            self._items.move_to_end(bytes(key))
            self.hits += 1
            return s

    def discard(self, keys: Iterable[bytes]) -> int:
        n = 0
        with self._lock:
            for key in keys:
                s = self._items.pop(bytes(key), None)
                if s is not None:
                    self._bytes -= s.nbytes
                    n += 1
        return n

    def stats(self) -> dict:
        return {
            "summaries": len(self._items),
            "used_bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "computed": self.computed,
            "dropped": self.dropped,
        }
