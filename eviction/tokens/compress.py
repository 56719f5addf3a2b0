"""The one compressor: scores -> kept token ids per layer and KV head, under a budget.

``Compressor(scorer, ratio=0.5)`` (or ``budget=K`` tokens per head) keeps, per KV head:

1. the ``sink_tokens`` first tokens and the ``window_tokens`` most recent ones, always (so the
   budget never goes below ``sink_tokens + window_tokens``);
2. the best-scoring other tokens up to the head's budget.

Budgets across layers come from the scorer (``layer_budget``: uniform, or PyramidKV's
decreasing schedule); budgets across the KV heads of a layer are

- ``head_budgets="uniform"``: every head keeps the same number of tokens;
- ``head_budgets="adaptive"`` (AdaKV): the layer keeps ``H_kv · budget`` tokens in all, chosen by
  one top-k over the scores of all its heads, each head guaranteed ``floor · budget`` of them;
- a ``HeadProfile`` (DuoAttention-style): streaming heads keep sinks + window only, retrieval
  heads share the rest of the layer's budget evenly.

The result, ``keep(...)``, is ``[B, H_kv, K]`` int64 token ids, ascending, padded with ``-1`` at
the end where heads keep different numbers of tokens — the ``indices`` format of
``sparse_attn.sparse_decode``. ``gather_kv`` makes the compressed cache (``drop`` mode);
``evicted_ids`` gives the complement, i.e. what ``demote`` mode moves to a lower tier.

Caches that were compressed before carry ``ScoreInputs.lengths`` ``[B, H_kv]`` (valid tokens per
head, the rest padding at the end of the token axis); sinks are the first tokens and the window
the last valid ones of each head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Scorer, ScoreInputs, check_int, check_real, get_scorer
from .heads import HeadProfile

_FORCED = float("inf")


@dataclass
class Compressor:
    scorer: Scorer | str
    ratio: float | None = None  # share of the tokens evicted, in [0, 1)
    budget: int | None = None  # tokens kept per KV head (mean over layers); exactly one of ratio / budget
    sink_tokens: int = 4
    window_tokens: int = 64
    head_budgets: str = "uniform"  # "uniform" | "adaptive"
    floor: float = 0.2  # adaptive: share of the uniform budget every head is guaranteed
    head_profile: HeadProfile | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scorer, str):
            self.scorer = get_scorer(self.scorer)
        if (self.ratio is None) == (self.budget is None):
            raise ValueError(f"give exactly one of ratio and budget, got ratio={self.ratio!r}, budget={self.budget!r}")
        if self.ratio is not None:
            check_real("ratio", self.ratio, low=0.0, high=1.0)
            if self.ratio >= 1.0:
                raise ValueError(f"ratio must be < 1 (some tokens must stay), got {self.ratio}")
        if self.budget is not None:
            check_int("budget", self.budget, low=1)
        check_int("sink_tokens", self.sink_tokens, low=0)
        check_int("window_tokens", self.window_tokens, low=0)
        if self.head_budgets not in ("uniform", "adaptive"):
            raise ValueError(f"head_budgets must be 'uniform' or 'adaptive', got {self.head_budgets!r}")
        check_real("floor", self.floor, low=0.0, high=1.0)
        if self.head_profile is not None and not isinstance(self.head_profile, HeadProfile):
            raise ValueError(f"head_profile must be a HeadProfile, got {type(self.head_profile).__name__}")
        if self.head_profile is not None and self.head_budgets == "adaptive":
            raise ValueError("use either head_budgets='adaptive' or a head_profile, not both")

    # -- budgets ------------------------------------------------------------------------------
    def layer_budget(self, num_tokens: int, layer: int, num_layers: int) -> int:
        """Tokens per KV head this layer keeps from a cache of ``num_tokens`` (before the sink/window floor)."""
        if self.budget is not None:
            mean = self.budget
        else:
            assert self.ratio is not None  # exactly one of ratio and budget (__post_init__)
            mean = num_tokens - math.floor(num_tokens * self.ratio)
        return self._scorer.layer_budget(mean, layer, num_layers)

    @property
    def _scorer(self) -> Scorer:
        """The scorer object (``__post_init__`` resolved a name given as ``scorer``)."""
        assert not isinstance(self.scorer, str)
        return self.scorer

    # -- the compressor -----------------------------------------------------------------------
    def keep(self, inputs: ScoreInputs) -> torch.Tensor:
        """Kept token ids ``[B, H_kv, K]`` (int64, ascending, -1 padding); see the module docstring."""
        B, H_kv, T = inputs.batch, inputs.num_kv_heads, inputs.num_tokens
        device = inputs.keys.device
        lengths = (
            torch.full((B, H_kv), T, dtype=torch.int64, device=device)
            if inputs.lengths is None
            else inputs.lengths.to(device=device, dtype=torch.int64)
        )
        budget = self.layer_budget(int(lengths.max()) if T else 0, inputs.layer, inputs.num_layers)
        if self.head_profile is not None:
            prof = self.head_profile.retrieval
            if prof.shape != (inputs.num_layers, H_kv):
                raise ValueError(f"head_profile is for {list(prof.shape)} (layers, KV heads), the cache has [{inputs.num_layers}, {H_kv}]")
        scorer = self._scorer
        scores = scorer.score(inputs).float()
        if tuple(scores.shape) != (B, H_kv, T):
            raise RuntimeError(f"scorer {scorer.name!r} returned {list(scores.shape)}, expected {[B, H_kv, T]}")
        pos = torch.arange(T, device=device).view(1, 1, T)
        valid = pos < lengths.unsqueeze(-1)
        forced = valid & ((pos < self.sink_tokens) | (pos >= (lengths - self.window_tokens).unsqueeze(-1)))
        scores = scores.masked_fill(~valid, float("-inf")).masked_fill(forced, _FORCED)
        num_forced = forced.sum(-1)  # [B, H_kv]

        if self.head_profile is not None:
            kept = self._keep_profile(scores, forced, valid, budget, inputs.layer)
        elif self.head_budgets == "adaptive":
            kept = self._keep_adaptive(scores, valid, num_forced, budget)
        else:
            per_head = torch.maximum(torch.full_like(num_forced, budget), num_forced)
            kept = _top_per_head(scores, valid, per_head)
        scorer.on_compress(inputs.layer, kept)
        return kept

    def _keep_adaptive(self, scores, valid, num_forced, budget):
        B, H_kv, T = scores.shape
        # every head's first floor*budget best are guaranteed, then one top-k over the layer
        guaranteed = torch.maximum(num_forced, torch.full_like(num_forced, math.floor(self.floor * budget)))
        guard = _rank_mask(scores, valid, guaranteed)
        total = torch.maximum((guard.sum(-1)).sum(-1), torch.full((B,), H_kv * budget, device=scores.device))
        boosted = scores.masked_fill(guard, _FORCED).view(B, H_kv * T)
        order = torch.argsort(boosted, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(H_kv * T, device=scores.device).expand(B, -1))
        chosen = (rank < total.view(B, 1)).view(B, H_kv, T) & valid
        return _ids_from_mask(chosen)

    def _keep_profile(self, scores, forced, valid, budget, layer):
        B, H_kv, T = scores.shape
        retrieval = self.head_profile.retrieval[layer].to(scores.device)  # [H_kv]
        num_forced = forced.sum(-1)
        n_ret = int(retrieval.sum())
        per_head = num_forced.clone()  # streaming heads: sinks + window
        if n_ret:
            spare = H_kv * budget - num_forced.masked_fill(retrieval, 0).sum(-1)  # [B]
            share = torch.div(spare, n_ret, rounding_mode="floor").view(B, 1).expand(B, H_kv)
            per_head = torch.where(retrieval.view(1, H_kv), torch.maximum(share, num_forced), num_forced)
        return _top_per_head(scores, valid, per_head)


# -- applying a selection -------------------------------------------------------------------------
def gather_kv(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compressed cache (``drop`` mode): keys and values ``[B, H_kv, K, D]`` of the kept tokens
    (zeros in padding slots) and ``lengths`` ``[B, H_kv]`` (valid tokens per head)."""
    B, H_kv, T, D = keys.shape
    if kept.dim() != 3 or tuple(kept.shape[:2]) != (B, H_kv):
        raise ValueError(f"kept must be [{B}, {H_kv}, K], got {list(kept.shape)}")
    if kept.numel() and int(kept.max()) >= T:
        raise ValueError(f"kept ids must be < {T} (the cache length), got {int(kept.max())}")
    idx = kept.clamp(min=0).unsqueeze(-1).expand(B, H_kv, kept.shape[2], D)
    pad = (kept < 0).unsqueeze(-1)
    k = keys.gather(2, idx).masked_fill_(pad, 0)
    v = values.gather(2, idx).masked_fill_(pad, 0)
    return k, v, (kept >= 0).sum(-1)


def evicted_ids(kept: torch.Tensor, lengths: torch.Tensor | int) -> torch.Tensor:
    """The complement of ``kept`` within each head's valid tokens: ``[B, H_kv, E]``, ascending,
    -1 padding (what ``demote`` mode moves to a lower tier)."""
    B, H_kv, _ = kept.shape
    if isinstance(lengths, int):
        lengths = torch.full((B, H_kv), lengths, dtype=torch.int64, device=kept.device)
    T = int(lengths.max()) if lengths.numel() else 0
    mask = torch.arange(T, device=kept.device).view(1, 1, T) < lengths.unsqueeze(-1)
    if kept.shape[2]:
        keep_mask = torch.zeros(B, H_kv, T + 1, dtype=torch.bool, device=kept.device)
        keep_mask.scatter_(2, torch.where(kept < 0, T, kept), True)
        mask &= ~keep_mask[..., :T]
    return _ids_from_mask(mask)


# -- helpers --------------------------------------------------------------------------------------
def _rank_mask(scores: torch.Tensor, valid: torch.Tensor, per_head: torch.Tensor) -> torch.Tensor:
    """Mask of each head's ``per_head`` best valid tokens (ties: the earlier token)."""
    T = scores.shape[-1]
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(2, order, torch.arange(T, device=scores.device).expand_as(order))
    return (rank < per_head.unsqueeze(-1)) & valid


def _top_per_head(scores: torch.Tensor, valid: torch.Tensor, per_head: torch.Tensor) -> torch.Tensor:
    if scores.shape[-1] == 0:
        return torch.empty(*scores.shape[:2], 0, dtype=torch.int64, device=scores.device)
    if bool((per_head == per_head.flatten()[0]).all()):  # one budget for all heads: a plain top-k
        k = min(int(per_head.flatten()[0]), scores.shape[-1])
        top = torch.topk(scores, k, dim=-1, sorted=False)
        ids = torch.where(torch.isneginf(top.values), -1, top.indices)  # invalid (padding) tokens
        return _sort_pad_last(ids)
    return _ids_from_mask(_rank_mask(scores, valid, per_head))


def _sort_pad_last(ids: torch.Tensor) -> torch.Tensor:
    big = torch.iinfo(torch.int64).max
    ids = torch.sort(torch.where(ids < 0, big, ids), dim=-1).values
    return torch.where(ids == big, -1, ids)


def _ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, H, T]`` bool -> ascending ids of the True entries, ``[B, H, max count]``, -1 padding."""
    B, H, T = mask.shape
    K = int(mask.sum(-1).max()) if mask.numel() else 0
    pos = torch.arange(T, device=mask.device).expand(B, H, T)
    ids = torch.where(mask, pos, T)
    ids = torch.sort(ids, dim=-1).values[..., :K]
    return torch.where(ids == T, -1, ids)
