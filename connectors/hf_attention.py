"""kvtier's attention inside Hugging Face transformers causal LMs: sparse decode, token policies,
shared-prefix batches.

Three features, each usable on its own or through the transformers connector:

- ``SparseDecode`` (an ``AttentionHook``): while attached, prefill runs ordinary causal SDPA and
  every decode step attends, per KV head, only the ``budget`` tokens a retrieval selector picks
  (``retrieval.get_selector``: Quest pages by default), through ``sparse_attn.sparse_decode``::

      hook = SparseDecode(selector="quest", budget=512)
      with hook.attach(model):
          out = model.generate(ids, max_new_tokens=32, do_sample=False)

- ``TokenPolicy`` (a ``TokenPolicyRuntime``, in ``hf_tokens``): greedy generation under a fast-tier
  token budget with ``eviction.tokens.EvictingKV`` (``drop`` or ``demote`` with recall).
- ``shared_prefix_generate`` (in ``hf_shared_prefix``): a batch of sequences that share a prefix,
  decode attention through ``sparse_attn.shared_prefix_decode`` (Hydragen).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .hf_dispatch import bind, model_dims, sdpa

SPARSE_ATTENTION = "kvtier_sparse"


@dataclass
class SparseDecodeStats:
    decode_calls: int = 0  # (layer, step) decode attention calls
    sparse_calls: int = 0  # of which attended a selection (context longer than the budget, layer not dense)
    selected_tokens: int = 0  # tokens attended by the sparse calls, summed over sequences and KV heads
    context_tokens: int = 0  # tokens full attention would have read in those calls (same sums)
    state_builds: int = 0  # selector states built from the whole context (once per request and layer)
    attention_seconds: float = 0.0  # wall time inside the decode attention function (selection included; on a GPU: launch time)

    @property
    def read_fraction(self) -> float:
        """Share of the context the sparse calls read (selected / context tokens)."""
        return self.selected_tokens / self.context_tokens if self.context_tokens else 1.0


@dataclass
class _LayerState:
    selector_state: Any  # what selector.prepare returned, extended by every select
    num_tokens: int  # cached tokens the state has seen (a mismatch means the cache changed under it)


@dataclass
class SparseDecode:
    """Sparse decode attention for a transformers causal LM (an ``AttentionHook``).

    Args:
        selector: a registered selector name (``quest``, ``topk_exact``, ``tokenselect``, ``ann``,
            ``centroids``, ``sink_window``) or a selector instance from ``retrieval.get_selector``.
        budget: tokens each KV head attends per decode step, sinks and recent window included;
            a context of at most ``budget`` tokens is attended in full.
        num_sink, num_recent: tokens always kept at the start and the end (the selector's defaults,
            4 and 32, when ``None``); only with a selector name.
        dense_layers: the first ``dense_layers`` layers decode with full attention (Quest leaves
            its first two layers dense).
        selector_options: more options for the selector (e.g. ``page_tokens`` for Quest).
        record: keep the last selection of every layer in ``last_indices`` (``[B, H_kv, budget]``).

    Prefill (more than one query token) runs transformers' SDPA. A decode step of layer ``l``
    selects with the selector's state for (cache, ``l``): built from the whole context on the
    first sparse step of a request, then extended by each step with the new tokens only (Quest:
    new full pages' bounds), so a step does not re-summarise the context. States are keyed by the
    cache object the model was called with (a new cache is a new request) and rebuilt when the
    cache no longer has the length the state saw (cropped, reset). Batches of equal-length
    sequences (no padding) are supported; a padded batch is a ``ValueError`` at its first decode step.
    """

    selector: Any = "quest"
    budget: int = 512
    num_sink: int | None = None
    num_recent: int | None = None
    dense_layers: int = 0
    selector_options: dict = field(default_factory=dict)
    record: bool = False

    def __post_init__(self) -> None:
        from kvtier.retrieval import get_selector
        from kvtier.retrieval.selectors import SelectorBase

        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget <= 0:
            raise ValueError(f"budget must be a positive int (tokens per KV head), got {self.budget!r}")
        if not isinstance(self.dense_layers, int) or isinstance(self.dense_layers, bool) or self.dense_layers < 0:
            raise ValueError(f"dense_layers must be a non-negative int, got {self.dense_layers!r}")
        if isinstance(self.selector, str):
            opts = dict(self.selector_options)
            if self.num_sink is not None:
                opts["num_sink"] = self.num_sink
            if self.num_recent is not None:
                opts["num_recent"] = self.num_recent
            self._selector = get_selector(self.selector, **opts)
        elif isinstance(self.selector, SelectorBase):
            if self.num_sink is not None or self.num_recent is not None or self.selector_options:
                raise ValueError("num_sink, num_recent and selector_options go with a selector name; "
                                 f"configure the {self.selector.name!r} instance itself instead")
            self._selector = self.selector
        else:
            raise ValueError(f"selector must be a selector name or a retrieval selector instance, got {type(self.selector).__name__}")
        kept = self._selector.num_sink + self._selector.num_recent
        if self.budget < kept:
            raise ValueError(f"budget must be at least num_sink + num_recent = {kept}, got {self.budget}")
        self._stats = SparseDecodeStats()
        self._selected = 0  # a tensor once decoding: summed without a device sync per step
        self.last_indices: dict[int, torch.Tensor] = {}
        self._states: dict[int, tuple[weakref.ref, dict[int, _LayerState]]] = {}

    @property
    def stats(self) -> SparseDecodeStats:
        """Counters since construction (or ``reset_stats``)."""
        self._stats.selected_tokens = int(self._selected)
        return self._stats

    def reset_stats(self) -> None:
        self._stats, self._selected = SparseDecodeStats(), 0

    # -- the hook ------------------------------------------------------------------------------------
    def attach(self, model) -> contextlib.AbstractContextManager:
        """Run the model's attention through this hook inside the ``with`` block (restored on exit).
        Selector states outlive the block (they follow the cache), so attaching around every
        forward call of one request is fine."""
        model_dims(model)
        return bind(model, SPARSE_ATTENTION, self._attend, sdpa_mask=True, capture_cache=True)

    def reset(self) -> None:
        """Forget every request's selector state (the counters stay: ``reset_stats``)."""
        self._states.clear()
        self.last_indices.clear()

    def layer_state(self, cache, layer: int) -> Any:
        """The selector state kept for ``(cache, layer)`` (``None`` before its first sparse step)."""
        entry = self._states.get(id(cache))
        if entry is None or entry[0]() is not cache:
            return None
        st = entry[1].get(layer)
        return None if st is None else st.selector_state

    # -- the attention function -----------------------------------------------------------------------
    def _attend(self, module, query, key, value, attention_mask, *, cache=None, cache_position=None, scaling=None, **kwargs):
        if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
            raise ValueError("SparseDecode supports full causal attention layers only (no sliding window, no softcap)")
        B, H_q, n, D = query.shape
        T = key.shape[2]
        if cache_position is not None and cache_position.numel():
            T = min(T, int(cache_position[-1]) + 1)  # static caches hand over their whole buffer
        layer = module.layer_idx
        states = self._request_states(cache)
        st = states.get(layer) if states is not None else None
        if st is not None and st.num_tokens != T - n:  # the cache changed outside our view: start over
            del states[layer]
            st = None
        if n > 1:
            out = sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
            if st is not None:
                st.num_tokens = T
            return out
        self._check_no_padding(attention_mask, T)
        from kvtier.sparse_attn import sparse_decode

        t0 = time.perf_counter()
        stats = self._stats
        stats.decode_calls += 1
        q = query[:, :, 0]  # [B, H_q, D]
        if T <= self.budget or layer < self.dense_layers:
            lengths = None if T == key.shape[2] else torch.full((B,), T, dtype=torch.int64, device=key.device)
            o, _ = sparse_decode(q, key, value, None, lengths, scale=scaling)
        else:
            k = key[:, :, :T]  # [B, H_kv, T, D] (a view)
            if st is None:
                st = _LayerState(self._selector.prepare(k[:, :, : T - 1]), T - 1)
                stats.state_builds += 1
                if states is not None:
                    states[layer] = st
            ids = self._selector.select(q, k, self.budget, st.selector_state)  # [B, H_kv, budget]
            o, _ = sparse_decode(q, key, value, ids, scale=scaling, check_indices=False)
            stats.sparse_calls += 1
            self._selected = self._selected + (ids >= 0).sum()
            stats.context_tokens += B * ids.shape[1] * T
            if self.record:
                self.last_indices[layer] = ids
        if st is not None:
            st.num_tokens = T
        stats.attention_seconds += time.perf_counter() - t0
        return o.unsqueeze(1).to(query.dtype), None  # [B, 1, H_q, D]

    def _request_states(self, cache) -> dict[int, _LayerState] | None:
        if cache is None:
            return None  # no cache: nothing persists between calls
        key = id(cache)
        entry = self._states.get(key)
        if entry is not None and entry[0]() is cache:
            return entry[1]
        for k in [k for k, (ref, _) in self._states.items() if ref() is None]:  # caches gone: their states go too
            del self._states[k]
        states: dict[int, _LayerState] = {}
        self._states[key] = (weakref.ref(cache), states)
        return states

    @staticmethod
    def _check_no_padding(attention_mask, T: int) -> None:
        if attention_mask is None:
            return
        m = attention_mask[..., :T]
        ok = bool(m.all()) if m.dtype == torch.bool else bool((m == 0).all())
        if not ok:
            raise ValueError("SparseDecode decodes batches of equal-length sequences without padding; the attention mask "
                             "hides some cached tokens (a padded batch): decode such sequences separately")


from .hf_shared_prefix import shared_prefix_generate  # noqa: E402  (re-exported: one import for the connector)
from .hf_tokens import TokenPolicy  # noqa: E402

__all__ = ["SPARSE_ATTENTION", "SparseDecode", "SparseDecodeStats", "TokenPolicy", "shared_prefix_generate"]
