"""DuoAttention-style head profiles: which KV heads retrieve from the whole context, and which only
look at the attention sinks and the recent window (streaming heads).

A head is measured, on synthetic pass-key prompts (or any prompts), by the share of its attention
mass that falls OUTSIDE the sinks and the local window of each query: a streaming head puts
almost nothing there, a retrieval head a lot. ``HeadProfiler`` accumulates that share per layer
and KV head from the queries and keys of each layer; ``HeadProfile`` marks the heads with the
largest share as retrieval heads. Under a ``Compressor`` with a profile, streaming heads keep
their sinks and window only, and retrieval heads share what the streaming heads free.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import check_int, check_real, window_attention


def mass_outside(queries: torch.Tensor, keys: torch.Tensor, sink_tokens: int, window_tokens: int) -> torch.Tensor:
    """Share of each KV head's attention outside sinks + local window: ``[B, H_kv]`` float32.

    ``queries`` ``[B, H_q, W, D]`` are the last ``W`` positions of ``keys`` ``[B, H_kv, T, D]``;
    for the query at position ``p`` the local window is ``(p - window_tokens, p]``. Averaged over
    the window's queries and the query heads of each group.
    """
    B, H_q, W, D = queries.shape
    H_kv, T = keys.shape[1], keys.shape[2]
    attn = window_attention(queries, keys)  # [B, H_q, W, T]
    pos_q = torch.arange(T - W, T, device=keys.device).view(W, 1)
    pos_k = torch.arange(T, device=keys.device).view(1, T)
    inside = (pos_k < sink_tokens) | (pos_k > pos_q - window_tokens)  # [W, T]
    outside = attn.masked_fill(inside, 0.0).sum(dim=-1)  # [B, H_q, W]
    return outside.mean(dim=2).view(B, H_kv, H_q // H_kv).mean(dim=2)


class HeadProfiler:
    """Accumulates ``mass_outside`` per (layer, KV head) over any number of prompts."""

    def __init__(self, num_layers: int, num_kv_heads: int, *, sink_tokens: int = 4, window_tokens: int = 64) -> None:
        self.num_layers = check_int("num_layers", num_layers, low=1)
        self.num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=1)
        self.sink_tokens = check_int("sink_tokens", sink_tokens, low=0)
        self.window_tokens = check_int("window_tokens", window_tokens, low=1)
        self._sum = torch.zeros(num_layers, num_kv_heads, dtype=torch.float64)
        self._count = torch.zeros(num_layers, dtype=torch.int64)

    def observe(self, layer: int, queries: torch.Tensor, keys: torch.Tensor) -> None:
        check_int("layer", layer, low=0, high=self.num_layers - 1)
        if keys.dim() != 4 or keys.shape[1] != self.num_kv_heads:
            raise ValueError(f"keys must be [B, {self.num_kv_heads}, T, D], got {list(keys.shape)}")
        m = mass_outside(queries, keys, self.sink_tokens, self.window_tokens)  # [B, H_kv]
        self._sum[layer] += m.double().sum(dim=0).cpu()
        self._count[layer] += m.shape[0]

    def profile(self, retrieval_fraction: float) -> "HeadProfile":
        if bool((self._count == 0).any()):
            missing = [i for i, c in enumerate(self._count.tolist()) if c == 0]
            raise ValueError(f"no observations for layer(s) {missing}: observe every layer before profiling")
        mass = (self._sum / self._count.view(-1, 1)).float()
        return HeadProfile.from_mass(mass, retrieval_fraction, sink_tokens=self.sink_tokens, window_tokens=self.window_tokens)


@dataclass(frozen=True)
class HeadProfile:
    """``retrieval`` ``[L, H_kv]`` bool: True for a retrieval head, False for a streaming head."""

    retrieval: torch.Tensor
    mass: torch.Tensor | None = None  # [L, H_kv] float32, the measurement behind the choice
    sink_tokens: int = 4
    window_tokens: int = 64

    def __post_init__(self) -> None:
        r = self.retrieval
        if not isinstance(r, torch.Tensor) or r.dim() != 2 or r.dtype != torch.bool:
            raise ValueError(
                f"retrieval must be a [num_layers, num_kv_heads] bool tensor, got "
                f"{list(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__}"
            )
        if self.mass is not None and tuple(self.mass.shape) != tuple(r.shape):
            raise ValueError(f"mass must have the shape of retrieval {list(r.shape)}, got {list(self.mass.shape)}")

    @classmethod
    def from_mass(cls, mass: torch.Tensor, retrieval_fraction: float, *, sink_tokens: int = 4, window_tokens: int = 64) -> "HeadProfile":
        """The ``ceil(retrieval_fraction · L · H_kv)`` heads of largest ``mass`` are retrieval heads."""
        check_real("retrieval_fraction", retrieval_fraction, low=0.0, high=1.0)
        if mass.dim() != 2:
            raise ValueError(f"mass must be [num_layers, num_kv_heads], got {list(mass.shape)}")
        n = math.ceil(retrieval_fraction * mass.numel())
        retrieval = torch.zeros(mass.numel(), dtype=torch.bool)
        if n:
            retrieval[torch.topk(mass.flatten().float(), n).indices] = True
        return cls(retrieval.view(mass.shape), mass.float().cpu(), sink_tokens, window_tokens)

    @property
    def retrieval_fraction(self) -> float:
        return float(self.retrieval.float().mean())

    def to_dict(self) -> dict:
        return {
            "retrieval": self.retrieval.int().tolist(),
            "mass": None if self.mass is None else self.mass.tolist(),
            "sink_tokens": self.sink_tokens,
            "window_tokens": self.window_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "HeadProfile":
        try:
            mass = d.get("mass")
            return cls(
                torch.tensor(d["retrieval"], dtype=torch.int64).bool(),
                None if mass is None else torch.tensor(mass, dtype=torch.float32),
                int(d.get("sink_tokens", 4)),
                int(d.get("window_tokens", 64)),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a head profile: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "HeadProfile":
        return cls.from_dict(json.loads(Path(path).read_text()))
