"""Queries and keys of the reference model, per layer and head, for retrieval measurements.

Built on ``bench/refmodel.py`` (the SmolLM2-135M-Instruct helpers). Two things it adds:

- ``capture(model, ids)``: prefill ``ids`` and record, for every layer, the post-RoPE queries of
  every position (``[L, H_q, T, D]``, float16 to halve the memory) next to the KV cache
  (``[L, 2, H_kv, T, D]`` float32): the decode queries of a context are the queries of the
  positions after it, its prefill queries the ones inside it.
- ``attention_override(fn)``: a context manager that routes the model's attention through
  ``fn(module, query, key, value, attention_mask, scaling, default)`` (``default`` is the original
  SDPA function), used to capture queries and to run decode over selected tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from bench import refmodel


@contextlib.contextmanager
def attention_override(fn: Callable):
    """Route every attention call of a transformers model (``sdpa`` implementation) through ``fn``."""
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    original = mapping["sdpa"]

    def wrapped(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        def default(q=query, k=key, v=value):
            return original(module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kw)

        return fn(module, query, key, value, attention_mask, scaling, default)

    mapping["sdpa"] = wrapped
    try:
        yield
    finally:
        mapping["sdpa"] = original


@dataclass
class Captured:
    queries: torch.Tensor  # [L, H_q, T, D] float16, post-RoPE, every position
    kv: torch.Tensor  # [L, 2, H_kv, T, D] float32
    scaling: float


@torch.inference_mode()
def capture(model, input_ids, chunk_tokens: int = 1024) -> Captured:
    """Prefill ``input_ids`` and keep every layer's queries and the whole KV cache."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).view(-1)
    per_layer: dict[int, list[torch.Tensor]] = {}
    scaling = [None]

    def record(module, query, key, value, mask, scale, default):
        per_layer.setdefault(module.layer_idx, []).append(query[0].to(torch.float16))  # [H_q, n, D]
        scaling[0] = scale
        return default()

    with attention_override(record):
        state = refmodel.prefill(model, ids, chunk_tokens=chunk_tokens)
    queries = torch.stack([torch.cat(per_layer[i], 1) for i in sorted(per_layer)])  # [L, H_q, T, D]
    kv = refmodel.CacheView(state.cache).read()
    return Captured(queries, kv, float(scaling[0]))
