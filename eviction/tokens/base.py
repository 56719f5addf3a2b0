"""Token scorers: the one extension point of token eviction, and the inputs every scorer sees.

A scorer looks at ONE layer of a sequence batch's KV cache and answers, per KV head and token, how
much that token is worth keeping: ``score(inputs) -> [B, H_kv, T]`` (float32, higher keeps). The
compressor (``eviction.tokens.compress``) turns scores into kept token ids under a budget and
always keeps the attention sinks and the recent window, so a scorer never has to special-case them.

What a scorer may look at (``ScoreInputs``):

- ``keys`` / ``values`` ``[B, H_kv, T, D]``: the layer's cached KV, keys after RoPE, as an engine
  holds them;
- ``queries`` ``[B, H_q, W, D]`` (optional): the observation window, i.e. the queries (after RoPE)
  of the last ``W`` tokens of the cache, which are the last ``W`` positions of ``keys``. In
  *query-aware* mode the question is inside this window; in *query-agnostic* mode it is the end
  of the context alone. Scorers that need queries raise ``ValueError`` when there are none;
- ``layer`` / ``num_layers``: which layer this is (layer-dependent budgets, per-layer state).

Stateful scorers (H2O's accumulated attention) keep one state per layer aligned with the cache's
token axis; the compressor tells them which tokens survived (``on_compress``) so the state stays
aligned, and ``reset()`` forgets every sequence.

A scorer is a dataclass whose fields are its configuration, validated in ``__post_init__``;
``get_scorer(name, **options)`` builds one by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from kvtier.checks import check_int, check_real  # noqa: F401  (re-exported for the scorers)
from kvtier.registry import Registry


@dataclass(frozen=True)
class ScoreInputs:
    """One layer of a batch of sequences, as a scorer sees it (see the module docstring)."""

    keys: torch.Tensor  # [B, H_kv, T, D]
    values: torch.Tensor  # [B, H_kv, T, D]
    queries: torch.Tensor | None = None  # [B, H_q, W, D], the last W positions of the cache
    layer: int = 0
    num_layers: int = 1
    lengths: torch.Tensor | None = None  # [B, H_kv] valid tokens per head (padding after them); None: all T

    def __post_init__(self) -> None:
        k, v, q = self.keys, self.values, self.queries
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError(f"keys must be a [B, H_kv, T, D] tensor, got {_shape(k)}")
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"values must have the shape of keys {list(k.shape)}, got {_shape(v)}")
        if not k.is_floating_point() or not v.is_floating_point():
            raise ValueError(f"keys and values must be floating point, got {k.dtype} and {v.dtype}")
        if q is not None:
            if not isinstance(q, torch.Tensor) or q.dim() != 4:
                raise ValueError(f"queries must be a [B, H_q, W, D] tensor, got {_shape(q)}")
            B, H_kv, T, D = k.shape
            if q.shape[0] != B or q.shape[3] != D:
                raise ValueError(f"queries must be [{B}, H_q, W, {D}] to match keys {list(k.shape)}, got {list(q.shape)}")
            if q.shape[1] % H_kv:
                raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({H_kv})")
            if q.shape[2] > T:
                raise ValueError(f"observation window ({q.shape[2]} queries) is longer than the cache ({T} tokens)")
            if not q.is_floating_point():
                raise ValueError(f"queries must be floating point, got {q.dtype}")
        if self.lengths is not None:
            B, H_kv, T = k.shape[:3]
            ln = self.lengths
            if not isinstance(ln, torch.Tensor) or tuple(ln.shape) != (B, H_kv) or ln.is_floating_point():
                raise ValueError(f"lengths must be an integer [{B}, {H_kv}] tensor, got {_shape(ln)}")
            if ln.numel() and (int(ln.min()) < 0 or int(ln.max()) > T):
                raise ValueError(f"lengths must lie in [0, {T}], got [{int(ln.min())}, {int(ln.max())}]")
            if q is not None and ln.numel() and int(ln.min()) < q.shape[2]:
                raise ValueError(
                    f"every head must hold the {q.shape[2]} tokens of the observation window, got lengths down to {int(ln.min())}"
                )
        check_int("num_layers", self.num_layers, low=1)
        check_int("layer", self.layer, low=0, high=self.num_layers - 1)

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    def valid(self) -> torch.Tensor:
        """``[B, H_kv, T]`` bool: which slots hold a token (all, without ``lengths``)."""
        B, H_kv, T = self.keys.shape[:3]
        if self.lengths is None:
            return torch.ones(B, H_kv, T, dtype=torch.bool, device=self.keys.device)
        pos = torch.arange(T, device=self.keys.device).view(1, 1, T)
        return pos < self.lengths.to(self.keys.device).unsqueeze(-1)

    def need_queries(self, scorer: str) -> torch.Tensor:
        if self.queries is None or self.queries.shape[2] == 0:
            raise ValueError(f"scorer {scorer!r} needs an observation window of queries; got none")
        return self.queries


def _shape(t: object) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """``[B, H_kv, T]`` float32, higher = keep. Must not modify ``inputs``."""

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int:
        """Tokens per KV head this layer keeps when the mean over layers is ``budget``."""

    def on_compress(self, layer: int, kept: torch.Tensor) -> None:
        """The tokens ``kept`` ``[B, H_kv, K]`` (-1 padding) survived in ``layer`` (state alignment)."""

    def reset(self) -> None:
        """Forget all per-sequence state."""


class ScorerBase:
    """Defaults for the optional parts of the protocol: uniform layer budgets, no state."""

    name: str = ""

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int:
        return budget

    def on_compress(self, layer: int, kept: torch.Tensor) -> None:
        return None

    def reset(self) -> None:
        return None


# -- shared maths -------------------------------------------------------------------------------
def window_attention(
    queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention of the window queries over the cache, causal: ``[B, H_q, W, T]`` float32.

    Query ``w`` of the window is the token in slot ``n - W + w`` of its KV head, ``n`` the head's
    valid length (``lengths``, default ``T``), and sees slots ``0 .. n - W + w``; padding slots
    (``>= n``) get no attention.
    """
    B, H_q, W, D = queries.shape
    H_kv, T = keys.shape[1], keys.shape[2]
    group = H_q // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q = queries.float().reshape(B, H_kv, group * W, D)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).mul_(scale)  # [B, H_kv, group*W, T]
    logits = logits.view(B, H_kv, group, W, T)
    n = torch.full((B, H_kv), T, device=keys.device) if lengths is None else lengths.to(keys.device)
    last = n.view(B, H_kv, 1, 1) - W + torch.arange(W, device=keys.device).view(1, 1, W, 1)  # [B, H_kv, W, 1]
    pos_k = torch.arange(T, device=keys.device).view(1, 1, 1, T)
    logits.masked_fill_((pos_k > last).unsqueeze(2), float("-inf"))
    return torch.softmax(logits, dim=-1).view(B, H_q, W, T)


def group_mean(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[B, H_q, T] -> [B, H_kv, T]``: the mean over the query heads that share a KV head."""
    B, H_q, T = per_query_head.shape
    return per_query_head.view(B, num_kv_heads, H_q // num_kv_heads, T).mean(dim=2)


# -- registry -----------------------------------------------------------------------------------
_SCORERS: Registry[Any] = Registry("scorer")  # scorer classes, each with its own options
S = TypeVar("S", bound=type)


def register_scorer(cls: S) -> S:
    """Class decorator: make ``cls`` selectable as ``get_scorer(cls.name, **options)``."""
    return _SCORERS.register(cls)


def available_scorers() -> list[str]:
    return _SCORERS.names()


def get_scorer(name: str, **options) -> Scorer:
    """A new scorer. ValueError for an unknown name, option or option value."""
    return _SCORERS.make(name, **options)
