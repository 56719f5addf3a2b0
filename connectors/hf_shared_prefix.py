"""A batch of sequences that share a prefix, decoded with Hydragen (``sparse_attn.shared_prefix_decode``).

The prefix's KV is computed once (or handed over, e.g. loaded from kvtier) and held once; each
sequence keeps only its own suffix's KV. Every attention call of the model goes through one
registered function:

- a sequence's suffix prefill (``n`` queries): the queries against the prefix (the ``n`` rows are a
  batch over one shared prefix: ``shared_prefix_decode``) LSE-merged with causal attention over the
  suffix's own tokens;
- a decode step of the whole batch: ``shared_prefix_decode(q, prefix, suffixes)`` — the batch's
  queries against the prefix as one matrix product per KV head, each sequence against its own
  suffix, merged by LSE.

``attention="per_sequence"`` is the baseline an engine without prefix sharing runs: the prefix is
copied into every sequence's cache and each sequence attends its own whole cache
(``sparse_decode`` with every token). Both give the same tokens as generating each sequence alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .hf_dispatch import bind, model_dims
from .hf_tokens import _check_ids, check_prefix_kv

SHARED_PREFIX_ATTENTION = "kvtier_shared_prefix"


@dataclass
class SharedPrefixStats:
    """Filled by ``shared_prefix_generate(..., stats=SharedPrefixStats())``."""

    prefix_seconds: float = 0.0  # computing the prefix's KV (0 when it was given)
    suffix_seconds: float = 0.0  # the suffixes' prefills
    decode_seconds: float = 0.0  # the batched decode steps (whole model)
    decode_steps: int = 0
    decode_attention_seconds: float = 0.0  # inside the attention function during decode (all layers)
    prefix_tokens: int = 0
    batch: int = 0


class _Batch:
    """Per-layer prefix and suffix KV, and the attention function over them."""

    def __init__(self, prefix_kv, batch: int, capacity: int, attention: str) -> None:
        self.attention = attention
        self.prefix = [(k[0], v[0]) for k, v in prefix_kv]  # [H_kv, T_p, D] each, held once
        Tp = self.prefix[0][0].shape[1]
        self.Tp = Tp
        H, D = self.prefix[0][0].shape[0], self.prefix[0][0].shape[2]
        k0 = self.prefix[0][0]
        if attention == "shared":  # suffixes only
            self.k = [k0.new_zeros(batch, H, capacity, D) for _ in self.prefix]  # [B, H_kv, cap, D]
            self.v = [k0.new_zeros(batch, H, capacity, D) for _ in self.prefix]
            self.offset = 0
        else:  # every sequence holds a copy of the prefix, then its suffix
            self.k = [
                torch.cat([pk.unsqueeze(0).expand(batch, -1, -1, -1), k0.new_zeros(batch, H, capacity, D)], 2) for pk, _ in self.prefix
            ]
            self.v = [
                torch.cat([pv.unsqueeze(0).expand(batch, -1, -1, -1), k0.new_zeros(batch, H, capacity, D)], 2) for _, pv in self.prefix
            ]
            self.offset = Tp
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=k0.device)  # suffix tokens per sequence
        self.row: int | None = None  # the sequence being prefilled, or None: decode the whole batch
        self.attention_seconds = 0.0

    def __call__(self, module, query, key, value, attention_mask, *, scaling=None, **kwargs):
        from kvtier.sparse_attn import merge_states, shared_prefix_decode, sparse_decode

        t0 = time.perf_counter()
        layer = module.layer_idx
        pk, pv = self.prefix[layer]
        B, H_q, n, D = query.shape
        if self.row is not None:  # one sequence's suffix prefill: [1, H_q, n, D]
            b = self.row
            q = query[0].transpose(0, 1)  # [n, H_q, D]: n rows sharing the prefix
            o_p, lse_p = shared_prefix_decode(q, pk, pv, scale=scaling)
            o_s, lse_s = _causal_states(query[0], key[0], value[0], scaling)  # [H_q, n, D], [H_q, n]
            o, _ = merge_states(o_p.float(), lse_p, o_s.transpose(0, 1), lse_s.transpose(0, 1))
            a = self.offset
            self.k[layer][b, :, a : a + n] = key[0]
            self.v[layer][b, :, a : a + n] = value[0]
            out = o.to(query.dtype).unsqueeze(0)  # [1, n, H_q, D]
        else:  # a decode step of the batch: [B, H_q, 1, D]
            rows = torch.arange(B, device=query.device)
            at = self.offset + self.lengths
            self.k[layer][rows, :, at] = key[:, :, 0]
            self.v[layer][rows, :, at] = value[:, :, 0]
            lengths = self.lengths + 1
            if self.attention == "shared":
                o, _ = shared_prefix_decode(query[:, :, 0], pk, pv, self.k[layer], self.v[layer], suffix_lengths=lengths, scale=scaling)
            else:
                o, _ = sparse_decode(query[:, :, 0], self.k[layer], self.v[layer], None, lengths + self.Tp, scale=scaling)
            out = o.unsqueeze(1)  # [B, 1, H_q, D]
        self.attention_seconds += time.perf_counter() - t0
        return out, None


def _causal_states(q, k, v, scale):
    """Causal attention of ``q [H_q, n, D]`` over ``k, v [H_kv, n, D]``: ``(o [H_q, n, D], lse [H_q, n])`` float32."""
    H_q, n, D = q.shape
    H = k.shape[0]
    G = H_q // H
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = torch.matmul(q.float().reshape(H, G * n, D), k.float().transpose(1, 2)).view(H_q, n, n) * scale
    s.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)  # [H_q, n]
    p = torch.exp(s - lse.unsqueeze(-1)).view(H, G * n, n)
    return torch.matmul(p, v.float()).view(H_q, n, D), lse


@torch.inference_mode()
def prefix_kv_of(model, prefix_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prefix's KV per layer, ``(k, v)`` ``[1, H_kv, T, D]``, from one ordinary forward."""
    from transformers import DynamicCache

    ids = torch.as_tensor(list(prefix_ids), dtype=torch.long, device=model.device).view(1, -1)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [(lay.keys, lay.values) for lay in cache.layers]


@torch.inference_mode()
def shared_prefix_generate(
    model,
    prefix_ids: Sequence[int],
    suffix_ids_list: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    attention: str = "shared",
    stats: SharedPrefixStats | None = None,
) -> list[list[int]]:
    """Greedy ``max_new_tokens`` for each sequence ``prefix_ids + suffix_ids_list[b]``, decoded as one batch.

    Args:
        prefix_ids: the shared prefix (at least one token).
        suffix_ids_list: each sequence's own tokens after the prefix (at least one each; lengths may differ).
        prefix_kv: the prefix's KV when already computed (per layer ``(k, v)`` ``[1, H_kv, >= len(prefix_ids), D]``,
            e.g. loaded from kvtier); computed with one forward when ``None``.
        attention: ``"shared"`` (Hydragen, the prefix read once per batch) or ``"per_sequence"`` (the
            prefix copied into every sequence's cache: the baseline).
        stats: a ``SharedPrefixStats`` to fill with timings.

    Returns:
        the generated token ids per sequence, ``max_new_tokens`` each (no early stop): the same as
        greedy generation of each sequence alone, up to float rounding.
    """
    prefix = _check_ids("prefix_ids", prefix_ids)
    if not isinstance(suffix_ids_list, (list, tuple)) or not suffix_ids_list:
        raise ValueError(
            f"suffix_ids_list must be a non-empty list of token-id lists, got {type(suffix_ids_list).__name__} {str(suffix_ids_list)[:60]}"
        )
    suffixes = [_check_ids(f"suffix_ids_list[{b}]", s) for b, s in enumerate(suffix_ids_list)]
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if attention not in ("shared", "per_sequence"):
        raise ValueError(f"attention must be 'shared' or 'per_sequence', got {attention!r}")
    d = model_dims(model)
    Tp = len(prefix)
    dtype = next(model.parameters()).dtype
    st = stats if stats is not None else SharedPrefixStats()
    st.prefix_tokens, st.batch = Tp, len(suffixes)
    t0 = time.perf_counter()
    if prefix_kv is None:
        prefix_kv = prefix_kv_of(model, prefix)
        st.prefix_seconds = time.perf_counter() - t0
    else:
        check_prefix_kv(prefix_kv, Tp, Tp, d)
    prefix_kv = [(k[:, :, :Tp].to(model.device, dtype), v[:, :, :Tp].to(model.device, dtype)) for k, v in prefix_kv]
    B = len(suffixes)
    if max_new_tokens == 0:
        return [[] for _ in range(B)]
    batch = _Batch(prefix_kv, B, max(map(len, suffixes)) + max_new_tokens, attention)
    out: list[list[int]] = [[] for _ in range(B)]
    with bind(model, SHARED_PREFIX_ATTENTION, batch, sdpa_mask=False):
        t0 = time.perf_counter()
        for b, s in enumerate(suffixes):
            batch.row = b
            n = len(s)
            logits = model(
                input_ids=torch.tensor([s], device=model.device),
                position_ids=torch.arange(Tp, Tp + n, device=model.device).view(1, n),
                use_cache=False,
                logits_to_keep=1,
            ).logits
            batch.lengths[b] = n
            out[b].append(int(logits[0, -1].argmax()))
        st.suffix_seconds = time.perf_counter() - t0
        batch.row = None
        batch.attention_seconds = 0.0
        t0 = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            ids = torch.tensor([[o[-1]] for o in out], device=model.device)  # [B, 1]
            pos = (Tp + batch.lengths).view(B, 1)
            logits = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1).logits  # [B, 1, V]
            batch.lengths += 1
            for b, t in enumerate(logits[:, -1].argmax(-1).tolist()):
                out[b].append(t)
            st.decode_steps += 1
        st.decode_seconds = time.perf_counter() - t0
        st.decode_attention_seconds = batch.attention_seconds
    return out
