"""Selectors: a decode query in, the token ids each KV head should attend out (for ``sparse_decode``).

Every selector has the same shape of call::

    state = selector.prepare(k)                      # once per sequence and layer (indexes, centroids, page bounds)
    indices = selector.select(q, k, budget, state)   # every decode step

- ``q [B, H_q, D]``: the decode queries (GQA: query heads ``h*G .. h*G+G-1`` share KV head ``h``);
- ``k [B or 1, H_kv, T, D]``: the keys (a batch of 1 is shared by every query row);
- ``budget``: tokens per KV head, sinks and the recent window included;
- returns ``indices [B, H_kv, budget]`` int64: the selected token positions ascending, then
  ``-1`` padding. When ``T <= budget`` every token is selected.

Every selector always keeps the first ``num_sink`` tokens (attention sinks) and the last
``num_recent`` tokens (the recent window); the rest of the budget goes to the tokens it scores
highest. ``state`` is optional (``select`` prepares a throw-away one without it); a state
prepared for ``T`` tokens follows the sequence as it grows: ``select`` adds the new keys to it
(incremental index adds, new pages, new cluster members).

Registered names (``get_selector(name, **options)``, ``available_selectors()``):

- ``topk_exact``: the exact top tokens by ``max_g q_g . k`` over the group's query heads.
- ``tokenselect``: TokenSelect's head soft vote: per query head softmax of ``q . k``, summed over
  the group, top tokens by the sum.
- ``quest``: Quest: per 16-token page the upper bound ``sum_d max(q_d kmin_d, q_d kmax_d)``
  (maximum over the group), whole pages in score order while they fit the budget; with
  ``refine=r > 1`` the pages for ``r`` times the budget's free tokens are candidates and the
  budget's best of them by exact ``max_g q_g . k`` are kept (a second pass at token granularity).
- ``ann``: a ``KeyIndex`` per KV head (``backend``: exact / flat / ivf / hnsw, ``index_options``),
  top-``k`` per query head, merged over the group by maximum score.
- ``centroids``: Squeezed Attention: faiss k-means over the keys (``tokens_per_cluster``), clusters
  ranked by ``max_g q_g . c``, whole clusters taken in order and the boundary cluster by exact
  score; two-level (coarse centroids over the fine ones) above ``hierarchical_above`` clusters.
- ``sink_window``: StreamingLLM: the sinks and the most recent ``budget - num_sink`` tokens.

``CachedSelector`` wraps any of them and reuses the last selection while consecutive queries
stay similar (cosine >= ``threshold``), counting hits and misses.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import faiss
import numpy as np
import torch

from kvtier.checks import check_int, check_real
from kvtier.registry import Registry

from .index import make_index
from .summaries import PAGE_TOKENS, page_bounds, quest_scores

_SELECTORS: Registry[Callable[..., "SelectorBase"]] = Registry("selector")


def register_selector(name: str):
    """Class decorator: make the class selectable as ``get_selector(name, **options)``."""

    def deco(cls):
        cls.name = name
        return _SELECTORS.register(cls, name=name)

    return deco


def available_selectors() -> list[str]:
    return _SELECTORS.names()


def get_selector(name: str, **options) -> "SelectorBase":
    """A new selector. ValueError for an unknown name or option."""
    return _SELECTORS.make(name, **options)


class Selector(Protocol):
    name: str
    num_sink: int
    num_recent: int

    def prepare(self, k: torch.Tensor) -> Any: ...

    def select(self, q: torch.Tensor, k: torch.Tensor, budget: int, state: Any = None) -> torch.Tensor: ...


# ----------------------------------------------------------------------------- helpers


def check_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate ``q [B, H_q, D]`` and ``k [B or 1, H_kv, T, D]``; returns ``(B, H_q, H_kv, T, D)``."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a tensor [B, H_q, D], got {list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a tensor [B, H_kv, T, D], got {list(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}")
    B, H_q, D = q.shape
    Bk, H_kv, T, Dk = k.shape
    if Dk != D:
        raise ValueError(f"k head_dim must equal q's ({D}), got {Dk}")
    if Bk not in (1, B):
        raise ValueError(f"k batch must be 1 or B={B}, got {Bk}")
    if H_kv == 0 or H_q % H_kv:
        raise ValueError(f"H_q must be a multiple of H_kv: got H_q={H_q}, H_kv={H_kv}")
    if not q.is_floating_point() or not k.is_floating_point():
        raise ValueError(f"q and k must be floating point, got {q.dtype} and {k.dtype}")
    return B, H_q, H_kv, T, D


def mask_to_ids(mask: torch.Tensor, width: int) -> torch.Tensor:
    """``mask [..., T]`` bool -> ``[..., width]`` int64: the set positions ascending, then -1."""
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    keyed = torch.where(mask, pos, T)
    w = min(width, T)
    ids = keyed.topk(w, dim=-1, largest=False, sorted=True).values if w < T else keyed.sort(-1).values
    ids = torch.where(ids >= T, -1, ids)
    if w < width:
        ids = torch.cat([ids, ids.new_full((*ids.shape[:-1], width - w), -1)], -1)
    return ids


def topk_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    """``scores [..., T]`` -> bool mask of the ``n`` highest finite scores (ties: lower position first)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    n = min(n, scores.shape[-1])
    if n <= 0:
        return mask
    # stable: among equal scores the earlier position wins, so selections are deterministic
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n]
    mask.scatter_(-1, order, True)
    return mask & torch.isfinite(scores)


def _group(q: torch.Tensor, H_kv: int) -> torch.Tensor:
    B, H_q, D = q.shape
    return q.float().view(B, H_kv, H_q // H_kv, D)  # [B, H_kv, G, D]


# ----------------------------------------------------------------------------- base


@dataclass
class SelectorBase:
    """Sinks + recent window + the selector's own picks, composed into sorted ids."""

    num_sink: int = 4
    num_recent: int = 32
    name = "base"
    state_is_index = False  # True: prepare() builds an index (seconds per long context), built off the decode path

    def __post_init__(self) -> None:
        check_int("num_sink", self.num_sink, low=0)
        check_int("num_recent", self.num_recent, low=0)
        self.last_scanned = 0.0  # fraction of the T keys (or key-sized summaries) read by the last select

    # -- the protocol ----------------------------------------------------------------------
    def prepare(self, k: torch.Tensor) -> Any:
        """Per-sequence state built from the keys ``k [B, H_kv, T, D]`` (None for stateless selectors)."""
        return None

    def select(self, q: torch.Tensor, k: torch.Tensor, budget: int, state: Any = None) -> torch.Tensor:
        B, H_q, H_kv, T, D = check_qk(q, k)
        self._check_budget(budget, T)
        if T <= budget:
            self.last_scanned = 0.0
            return mask_to_ids(torch.ones(B, H_kv, T, dtype=torch.bool, device=k.device), budget)
        reserved = self.reserved_mask(T, budget, k.device)
        picked = self.pick(q, k, budget, state, reserved)
        return self.compose(reserved, picked, budget)

    # -- pieces (used by CachedSelector) ---------------------------------------------------
    def _check_budget(self, budget: int, T: int) -> None:
        check_int("budget", budget, low=1)
        if T > budget and budget < self.num_sink + self.num_recent:
            raise ValueError(
                f"budget must be at least num_sink + num_recent = {self.num_sink + self.num_recent} (the tokens always kept), got {budget}"
            )

    def reserved_mask(self, T: int, budget: int, device=None) -> torch.Tensor:
        """``[T]`` bool: the sinks and the recent window."""
        mask = torch.zeros(T, dtype=torch.bool, device=device)
        mask[: min(self.num_sink, T)] = True
        if self.num_recent:
            mask[max(0, T - self.num_recent) :] = True
        return mask

    def pick(self, q, k, budget: int, state, reserved: torch.Tensor) -> torch.Tensor:
        """``[B, H_kv, T]`` bool: at most ``budget - reserved.sum()`` tokens outside ``reserved``."""
        raise NotImplementedError

    def compose(self, reserved: torch.Tensor, picked: torch.Tensor, budget: int) -> torch.Tensor:
        mask = picked | reserved
        if int(mask.sum(-1).max()) > budget:
            raise RuntimeError(f"{self.name} selected more than the budget of {budget} tokens")
        return mask_to_ids(mask, budget)

    def _num_free(self, budget: int, reserved: torch.Tensor) -> int:
        return budget - int(reserved.sum())


class _ScoreSelector(SelectorBase):
    """A selector defined by a per-token score ``[B, H_kv, T]``: the top free tokens."""

    def scores(self, q4: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pick(self, q, k, budget, state, reserved):
        B, H_q, H_kv, T, D = check_qk(q, k)
        s = self.scores(_group(q, H_kv), k)  # [B, H_kv, T]
        s = s.masked_fill(reserved, float("-inf"))
        self.last_scanned = 1.0
        return topk_mask(s, self._num_free(budget, reserved))


@register_selector("topk_exact")
@dataclass
class TopKExact(_ScoreSelector):
    """Exact top tokens by ``max over the group of q_g . k``."""

    def scores(self, q4, k):
        s = q4 @ k.float().transpose(-1, -2)  # [B, H_kv, G, T]
        return s.amax(2)


@register_selector("tokenselect")
@dataclass
class TokenSelect(_ScoreSelector):
    """TokenSelect's head soft vote: sum over the group of per-head ``softmax(q . k * scale)``."""

    scale: float | None = None  # default 1/sqrt(D)

    def scores(self, q4, k):
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q4.shape[-1])
        s = (q4 @ k.float().transpose(-1, -2)) * scale  # [B, H_kv, G, T]
        return torch.softmax(s, -1).sum(2)


@register_selector("sink_window")
@dataclass
class SinkWindow(SelectorBase):
    """StreamingLLM: the sinks and the most recent ``budget - num_sink`` tokens."""

    def pick(self, q, k, budget, state, reserved):
        B, H_q, H_kv, T, D = check_qk(q, k)
        pos = torch.arange(T, device=k.device, dtype=torch.float32).masked_fill(reserved, float("-inf"))
        self.last_scanned = 0.0
        return topk_mask(pos, self._num_free(budget, reserved)).expand(B, H_kv, T)


# ----------------------------------------------------------------------------- Quest


@dataclass
class QuestState:
    kmin: torch.Tensor  # [Bk, H_kv, N_pages, D] over the full pages seen so far
    kmax: torch.Tensor
    num_tokens: int  # tokens covered by full pages


@register_selector("quest")
@dataclass
class Quest(SelectorBase):
    """Quest: page upper bounds, whole pages by score while they fit the budget."""

    page_tokens: int = PAGE_TOKENS
    refine: int = 1  # > 1: pages for refine * budget tokens, then the budget's best of them by exact q . k

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("page_tokens", self.page_tokens, low=1)
        check_int("refine", self.refine, low=1)

    def prepare(self, k) -> QuestState:
        P = self.page_tokens
        full = (k.shape[2] // P) * P
        kmin, kmax, _ = page_bounds(k[:, :, :full], P)
        return QuestState(kmin, kmax, full)

    def _extend(self, state: QuestState, k) -> QuestState:
        P = self.page_tokens
        full = (k.shape[2] // P) * P
        if full > state.num_tokens:
            kmin, kmax, _ = page_bounds(k[:, :, state.num_tokens : full], P)
            state.kmin = torch.cat([state.kmin, kmin], 2)
            state.kmax = torch.cat([state.kmax, kmax], 2)
            state.num_tokens = full
        return state

    def page_scores(self, q, k, state: QuestState | None = None) -> torch.Tensor:
        """``[B, H_kv, ceil(T / P)]``: per page the maximum over the group of its upper bound."""
        B, H_q, H_kv, T, D = check_qk(q, k)
        state = self.prepare(k) if state is None else self._extend(state, k)
        q4 = _group(q, H_kv)
        scores = quest_scores(q4, state.kmin, state.kmax).amax(2)  # [B, H_kv, full pages]
        if state.num_tokens < T:  # the trailing partial page, scored on its own (no copy of the full pages' bounds)
            tail = k[:, :, state.num_tokens :].float()
            tail_score = quest_scores(q4, tail.amin(2, keepdim=True), tail.amax(2, keepdim=True)).amax(2)  # [B, H_kv, 1]
            scores = torch.cat([scores, tail_score.expand(scores.shape[0], -1, -1)], 2)
        return scores  # [B, H_kv, N_pages]

    def pick(self, q, k, budget, state, reserved):
        T = k.shape[2]
        scores = self.page_scores(q, k, state)  # [B, H_kv, Np]
        self.last_scanned = 2 * scores.shape[-1] / T
        num_free = self._num_free(budget, reserved)
        picked = choose_pages(scores, reserved, self.page_tokens, num_free * self.refine)
        if self.refine == 1:
            return picked
        exact = (_group(q, k.shape[1]) @ k.float().transpose(-1, -2)).amax(2)  # [B, H_kv, T]
        self.last_scanned += float(picked.sum(-1).float().mean()) / T
        return topk_mask(exact.masked_fill(~picked, float("-inf")), num_free)

    def select(self, q, k, budget: int, state=None) -> torch.Tensor:
        """As ``SelectorBase.select`` (same ids), computed per page: no ``[B, H_kv, T]`` mask is built,
        so a decode step's cost is in the page scores, not in the length of the context."""
        B, H_q, H_kv, T, D = check_qk(q, k)
        self._check_budget(budget, T)
        if T <= budget:
            return super().select(q, k, budget, state)
        scores = self.page_scores(q, k, state)  # [B, H_kv, Np]
        self.last_scanned = 2 * scores.shape[-1] / T
        if self.refine == 1:
            return select_pages(scores, T, self.page_tokens, self.num_sink, self.num_recent, budget)
        sink = min(self.num_sink, T)
        recent = max(sink, T - self.num_recent) if self.num_recent else T  # tokens [recent, T) are the window
        num_reserved = sink + T - recent
        C = num_reserved + self.refine * (budget - num_reserved)  # the free part of the budget, refine times
        if C >= T:
            cand = torch.arange(T, device=k.device).expand(B, H_kv, T)
        else:
            cand = select_pages(scores, T, self.page_tokens, self.num_sink, self.num_recent, C)  # [B, H_kv, C]
        self.last_scanned += cand.shape[-1] / T
        return refine_tokens(_group(q, H_kv), k, cand, budget, sink, recent)


def refine_tokens(q4: torch.Tensor, k: torch.Tensor, cand: torch.Tensor, budget: int, sink_end: int, recent_start: int) -> torch.Tensor:
    """The ``budget`` best of the candidate tokens ``cand [B, H_kv, C]`` (ascending ids, -1 padding) by
    exact ``max_g q_g . k`` (``q4 [B, H_kv, G, D]``, ``k [B or 1, H_kv, T, D]``), tokens below
    ``sink_end`` or from ``recent_start`` on always kept: ``[B, H_kv, budget]`` ascending, -1 padding."""
    B, H_kv, C = cand.shape
    D = k.shape[-1]
    idx = cand.clamp(min=0).unsqueeze(-1).expand(B, H_kv, C, D)
    kc = k.expand(B, -1, -1, -1).gather(2, idx).float()  # [B, H_kv, C, D]
    s = (q4 @ kc.transpose(-1, -2)).amax(2)  # [B, H_kv, C]
    s = s.masked_fill((cand < sink_end) | (cand >= recent_start), float("inf")).masked_fill(cand < 0, float("-inf"))
    top = s.topk(min(budget, C), dim=-1)
    ids = torch.where(torch.isneginf(top.values), -1, cand.gather(-1, top.indices))
    big = torch.iinfo(torch.int64).max
    ids = torch.sort(torch.where(ids < 0, big, ids), dim=-1).values
    ids = torch.where(ids == big, -1, ids)
    if ids.shape[-1] < budget:
        ids = torch.cat([ids, ids.new_full((B, H_kv, budget - ids.shape[-1]), -1)], -1)
    return ids


def choose_pages(scores: torch.Tensor, reserved: torch.Tensor, page_tokens: int, num_free: int) -> torch.Tensor:
    """Whole pages in descending ``scores [..., Np]`` while their free tokens fit ``num_free``.

    ``reserved [T]`` marks tokens already kept (sinks, window): they cost nothing and are not
    returned. Returns ``[..., T]`` bool, the free tokens of the chosen pages.
    """
    T = reserved.shape[-1]
    Np = scores.shape[-1]
    if Np * page_tokens < T or (Np - 1) * page_tokens >= T:
        raise ValueError(f"{T} tokens need {-(-T // page_tokens)} pages of {page_tokens}, got scores for {Np}")
    free_tok = ~reserved
    free_per_page = torch.nn.functional.pad(free_tok, (0, Np * page_tokens - T)).view(Np, page_tokens).sum(-1)  # [Np]
    scores = scores.masked_fill(free_per_page == 0, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [..., Np]
    fits = (free_per_page[order].cumsum(-1) <= num_free) & torch.isfinite(scores.gather(-1, order))
    page_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, fits)
    return page_mask.repeat_interleave(page_tokens, -1)[..., :T] & free_tok


def select_pages(scores: torch.Tensor, T: int, page_tokens: int, num_sink: int, num_recent: int, budget: int) -> torch.Tensor:
    """``choose_pages`` + ``compose`` without token-length masks: the sinks, the recent window and the
    pages in descending ``scores [B, H, Np]`` while their free tokens fit, as ``[B, H, budget]`` ids
    ascending then ``-1`` (the same ids, for ``T > budget``)."""
    P = page_tokens
    Np = scores.shape[-1]
    device = scores.device
    sink = min(num_sink, T)
    recent = max(sink, T - num_recent) if num_recent else T  # tokens [recent, T) are the window
    reserved = torch.cat([torch.arange(sink, device=device), torch.arange(recent, T, device=device)])  # ascending
    num_free = budget - reserved.numel()
    start = torch.arange(Np, device=device) * P
    free_per_page = (torch.minimum(start + P, torch.full_like(start, recent)) - torch.clamp(start, min=sink)).clamp(min=0)  # [Np]
    scores = scores.masked_fill(free_per_page == 0, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B, H, Np]
    # at most two chosen pages are partly reserved, so num_free // P + 2 pages bound the choice
    width = min(Np, max(num_free, 0) // P + 2)
    order = order[..., :width]
    fits = (free_per_page[order].cumsum(-1) <= num_free) & torch.isfinite(scores.gather(-1, order))  # a prefix of the order
    tok = order.unsqueeze(-1) * P + torch.arange(P, device=device)  # [B, H, width, P]
    ok = fits.unsqueeze(-1) & (tok >= sink) & (tok < recent)
    big = torch.iinfo(torch.int64).max
    picked = torch.where(ok, tok, big).flatten(-2)  # [B, H, width * P]
    ids = torch.cat([reserved.expand(*picked.shape[:-1], -1), picked], -1)
    ids = torch.sort(ids, dim=-1).values[..., :budget]
    ids = torch.where(ids == big, -1, ids)
    if ids.shape[-1] < budget:
        ids = torch.cat([ids, ids.new_full((*ids.shape[:-1], budget - ids.shape[-1]), -1)], -1)
    return ids


# ----------------------------------------------------------------------------- ANN


@dataclass
class ANNState:
    indexes: list[list[Any]]  # [Bk][H_kv] KeyIndex
    num_tokens: int


@register_selector("ann")
@dataclass
class ANN(SelectorBase):
    """A ``KeyIndex`` per (sequence, KV head); top tokens per query head merged over the group by max score."""

    backend: str = "hnsw"
    index_options: dict = field(default_factory=dict)
    state_is_index = True

    def __post_init__(self) -> None:
        super().__post_init__()
        make_index(self.backend, 8, **self.index_options)  # validates the backend and its options

    def prepare(self, k) -> ANNState:
        Bk, H_kv, T, D = k.shape
        indexes = []
        for b in range(Bk):
            row = []
            for h in range(H_kv):
                idx = make_index(self.backend, D, **self.index_options)
                idx.add(k[b, h])
                row.append(idx)
            indexes.append(row)
        return ANNState(indexes, T)

    def extend(self, state: ANNState, k) -> ANNState:
        """Add the keys ``k[:, :, state.num_tokens:]`` to the indexes (``k [Bk, H_kv, T, D]``): a state
        prepared over a prefix and extended equals one prepared over all of ``k`` (an index of the
        same keys), so a long context's index can be built piece by piece."""
        T = k.shape[2]
        if T > state.num_tokens:
            for b, row in enumerate(state.indexes):
                for h, idx in enumerate(row):
                    idx.add(k[b, h, state.num_tokens : T])
            state.num_tokens = T
        return state

    _extend = extend

    def pick(self, q, k, budget, state, reserved):
        B, H_q, H_kv, T, D = check_qk(q, k)
        state = self.prepare(k) if state is None else state
        self._extend(state, k)
        n_free = self._num_free(budget, reserved)
        n_res = int(reserved.sum())
        q4 = _group(q, H_kv)  # [B, H_kv, G, D]
        G = q4.shape[2]
        mask = torch.zeros(B, H_kv, T, dtype=torch.bool)
        scanned = []
        Bk = len(state.indexes)
        for bk in range(Bk):
            rows = range(B) if Bk == 1 else [bk]
            for h in range(H_kv):
                idx = state.indexes[bk][h]
                qs = q4[list(rows), h].reshape(-1, D)  # [len(rows) * G, D]
                s, ids = idx.search(qs, min(n_free + n_res, T))
                scanned.append(idx.last_scanned)
                s = s.view(len(rows), G, -1).flatten(1)  # [rows, G * k]
                ids = ids.view(len(rows), G, -1).flatten(1)
                valid = ids >= 0
                ok = valid & ~reserved[ids.clamp_min(0)]
                s = s.masked_fill(~ok, float("-inf"))
                # max over the group per token: scatter_reduce into a dense [rows, T] score row
                dense = torch.full((len(rows), T), float("-inf"))
                dense.scatter_reduce_(1, ids.clamp_min(0), s, reduce="amax")
                sel = topk_mask(dense, n_free)
                for j, b in enumerate(rows):
                    mask[b, h] = sel[j]
        self.last_scanned = float(np.mean(scanned)) if scanned else 0.0
        return mask


# ----------------------------------------------------------------------------- centroids


@dataclass
class _Clusters:
    centroids: torch.Tensor  # [C, D]
    assign: torch.Tensor  # [T] int64 cluster of each key
    coarse: torch.Tensor | None = None  # [C2, D] centroids of the centroids (hierarchical)
    coarse_assign: torch.Tensor | None = None  # [C] coarse cluster of each fine centroid


@dataclass
class CentroidState:
    clusters: list[list[_Clusters]]  # [Bk][H_kv]
    num_tokens: int


def kmeans(x: torch.Tensor, num_clusters: int, niter: int = 10, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss k-means of ``x [N, D]`` -> ``(centroids [C, D], assignment [N])``."""
    xn = np.ascontiguousarray(x.detach().float().cpu().numpy())
    C = max(1, min(num_clusters, xn.shape[0]))
    km = faiss.Kmeans(xn.shape[1], C, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1, max_points_per_centroid=256)
    km.train(xn)
    assert km.centroids is not None  # train() sets them
    _, assign = km.index.search(xn, 1)
    return torch.from_numpy(km.centroids.copy()), torch.from_numpy(assign.ravel().astype(np.int64))


@register_selector("centroids")
@dataclass
class Centroids(SelectorBase):
    """Squeezed Attention: keys clustered by k-means; clusters ranked by their centroid's score."""

    tokens_per_cluster: int = 16
    hierarchical_above: int = 4096  # fine clusters above which a coarse level is added
    coarse_keep: float = 0.25  # share of the coarse clusters whose members are scored
    niter: int = 10
    state_is_index = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("tokens_per_cluster", self.tokens_per_cluster, low=1)
        check_real("coarse_keep", self.coarse_keep, low=0.0, high=1.0, low_open=True)

    def _cluster(self, keys: torch.Tensor) -> _Clusters:
        T = keys.shape[0]
        C = max(1, T // self.tokens_per_cluster)
        cents, assign = kmeans(keys, C, self.niter)
        cl = _Clusters(cents, assign)
        if cents.shape[0] > self.hierarchical_above:
            c2 = max(1, int(round(math.sqrt(cents.shape[0]))))
            cl.coarse, cl.coarse_assign = kmeans(cents, c2, self.niter)
        return cl

    def prepare(self, k) -> CentroidState:
        Bk, H_kv, T, D = k.shape
        return CentroidState([[self._cluster(k[b, h]) for h in range(H_kv)] for b in range(Bk)], T)

    def _extend(self, state: CentroidState, k) -> None:
        T = k.shape[2]
        if T > state.num_tokens:  # new keys join their nearest centroid (the clusters are not retrained)
            for b, row in enumerate(state.clusters):
                for h, cl in enumerate(row):
                    new = k[b, h, state.num_tokens : T].float()
                    near = torch.cdist(new, cl.centroids).argmin(-1)
                    cl.assign = torch.cat([cl.assign, near])
            state.num_tokens = T

    def pick(self, q, k, budget, state, reserved):
        B, H_q, H_kv, T, D = check_qk(q, k)
        state = self.prepare(k) if state is None else state
        self._extend(state, k)
        n_free = self._num_free(budget, reserved)
        q4 = _group(q, H_kv)
        mask = torch.zeros(B, H_kv, T, dtype=torch.bool)
        scanned = 0.0
        Bk = len(state.clusters)
        for b in range(B):
            for h in range(H_kv):
                cl = state.clusters[0 if Bk == 1 else b][h]
                qg = q4[b, h]  # [G, D]
                C = cl.centroids.shape[0]
                if cl.coarse is not None:
                    cs = (qg @ cl.coarse.T).amax(0)  # [C2]
                    keep = torch.topk(cs, max(1, int(math.ceil(self.coarse_keep * cs.numel())))).indices
                    alive = torch.isin(cl.coarse_assign, keep)  # [C]
                    fine = torch.full((C,), float("-inf"))
                    fine[alive] = (qg @ cl.centroids[alive].T).amax(0)
                    n_scored = cs.numel() + int(alive.sum())
                else:
                    fine = (qg @ cl.centroids.T).amax(0)  # [C]
                    n_scored = C
                free = ~reserved
                sizes = torch.bincount(cl.assign[free], minlength=C)  # free members per cluster
                fine = fine.masked_fill(sizes == 0, float("-inf"))
                order = torch.sort(fine, descending=True, stable=True).indices
                ok = torch.isfinite(fine[order])
                cum = sizes[order].cumsum(0)
                whole = order[(cum <= n_free) & ok]
                sel = torch.isin(cl.assign, whole) & free
                n_left = n_free - int(sel.sum())
                nxt = order[(cum > n_free) & ok]
                if n_left > 0 and nxt.numel():  # the boundary cluster: its best members by exact score
                    members = ((cl.assign == nxt[0]) & free).nonzero().view(-1)
                    s = (qg @ k[0 if k.shape[0] == 1 else b, h, members].float().T).amax(0)
                    best = members[torch.sort(s, descending=True, stable=True).indices[:n_left]]
                    sel[best] = True
                    n_scored += members.numel()
                mask[b, h] = sel
                scanned += n_scored / T
        self.last_scanned = scanned / (B * H_kv)
        return mask


# ----------------------------------------------------------------------------- selection cache


@dataclass
class _CacheEntry:
    q: torch.Tensor  # [B, H_q, D]
    picked: torch.Tensor  # [B, H_kv, T_then] bool
    budget: int


class CachedSelector:
    """Reuse the last selection while consecutive queries stay similar.

    ``select(q, k, budget, state, cache_key=...)``: when a previous call under ``cache_key`` (e.g.
    the layer index) had the same budget and shapes and every query row has cosine similarity
    ``>= threshold`` with that call's, the previous picks are reused (a hit: no scoring); the sinks
    and the recent window are always recomputed for the current length, so new tokens are never
    missed. Otherwise the wrapped selector runs (a miss). At most ``max_entries`` keys are kept (LRU).
    """

    def __init__(self, selector: SelectorBase, threshold: float = 0.95, max_entries: int = 1024) -> None:
        if not isinstance(selector, SelectorBase):
            raise ValueError(f"selector must be a registered selector instance, got {type(selector).__name__}")
        check_real("threshold (a cosine)", threshold, low=-1.0, high=1.0)
        check_int("max_entries", max_entries, low=1)
        self.selector = selector
        self.threshold = threshold
        self.max_entries = max_entries
        self._entries: OrderedDict[Any, _CacheEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return f"cached({self.selector.name})"

    def prepare(self, k):
        return self.selector.prepare(k)

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0, "entries": len(self._entries)}

    def reset(self) -> None:
        self._entries.clear()

    def select(self, q, k, budget: int, state=None, cache_key: Any = None) -> torch.Tensor:
        sel = self.selector
        B, H_q, H_kv, T, D = check_qk(q, k)
        sel._check_budget(budget, T)
        if T <= budget:
            return sel.select(q, k, budget, state)
        reserved = sel.reserved_mask(T, budget, k.device)
        entry = self._entries.get(cache_key)
        if entry is not None and entry.budget == budget and entry.q.shape == q.shape and entry.picked.shape[-1] <= T:
            cos = torch.nn.functional.cosine_similarity(q.float(), entry.q, dim=-1)  # [B, H_q]
            if bool((cos >= self.threshold).all()):
                self.hits += 1
                self._entries.move_to_end(cache_key)
                picked = torch.nn.functional.pad(entry.picked, (0, T - entry.picked.shape[-1])) & ~reserved
                return sel.compose(reserved, picked, budget)
        self.misses += 1
        picked = sel.pick(q, k, budget, state, reserved)
        self._entries[cache_key] = _CacheEntry(q.detach().float().clone(), picked, budget)
        self._entries.move_to_end(cache_key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return sel.compose(reserved, picked, budget)
