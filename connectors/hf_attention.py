"""kvtier's attention inside Hugging Face transformers causal LMs: sparse decode, token policies,
shared-prefix batches.

Three features, each usable on its own or through the transformers connector:

- ``SparseDecode`` (an ``AttentionHook``): while attached, prefill runs ordinary causal SDPA and
  every decode step attends, per KV head, only the ``budget`` tokens a retrieval selector picks
  (``retrieval.get_selector``: Quest pages by default), through ``sparse_attn.sparse_decode``::

      hook = SparseDecode(selector="quest", budget=512)
      with hook.attach(model):
          out = model.generate(ids, max_new_tokens=32, do_sample=False)

  With ``store=`` (a ``kvstore.TieredStore`` whose tiers use a page-addressable codec), decode
  runs with the context's KV offloaded: at the first decode step the full blocks of the prompt
  are written to the store and attention reads, per layer and KV head, only the pages it selects
  from the tiers (``retrieval.TierAttention``: hierarchical Quest selection, page cache,
  prefetch), merged by LSE with the tokens after the last stored block::

      store = TieredStore([TierConfig(DiskTier("/var/kv", 64 << 30, codec="paged"))])
      hook = SparseDecode(budget=512, store=store)

- ``TokenPolicy`` (a ``TokenPolicyRuntime``, in ``hf_tokens``): greedy generation under a fast-tier
  token budget with ``eviction.tokens.EvictingKV`` (``drop`` or ``demote`` with recall).
- ``shared_prefix_generate`` (in ``hf_shared_prefix``): a batch of sequences that share a prefix,
  decode attention through ``sparse_attn.shared_prefix_decode`` (Hydragen).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
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
    dense_calls: int = 0  # decode calls that ran full attention: short context (dense_below, budget), dense layer, state still building
    background_builds: int = 0  # of the state builds, those run in the background thread
    attention_seconds: float = 0.0  # wall time inside the decode attention function (selection included; on a GPU: launch time)

    offloaded_tokens: int = 0  # tokens written to the store (store mode)

    @property
    def read_fraction(self) -> float:
        """Share of the context the sparse calls read (selected / context tokens)."""
        return self.selected_tokens / self.context_tokens if self.context_tokens else 1.0


@dataclass
class _Offload:
    """Store mode: one request's context in the store."""

    ctx: Any  # retrieval.TierContext
    nonce: bytes
    num_tokens: int  # tokens stored (whole blocks)


@dataclass
class _LayerState:
    selector_state: Any  # what selector.prepare returned, extended by every select (None while building)
    num_tokens: int  # cached tokens the attention has seen (a mismatch means the cache changed under it)
    pending: Future | None = None  # a state being built in the background; the layer decodes densely until it is done


# Context length (tokens) below which a 32-token answer decodes faster with full attention than with
# the selector at budget 512, set-up (the selector's state) included: measured per selector with
# ``python bench/e2e_attn.py --crossover`` (the crossover table; SmolLM2-135M, one CPU thread, a
# shared 2-core box). ``SparseDecode(dense_below="auto")`` reads it for the cache's device type,
# scaled by ``budget / 512`` for larger budgets. A selector missing here decodes densely below
# ``_DEFAULT_CROSSOVER``. Not measured on a GPU yet: CUDA uses the CPU figures until it is.
# Measured: quest, ann, topk_exact. tokenselect scores every key as topk_exact does, and centroids'
# step loops over heads in Python as ann's does: "never" too (not measured end to end).
CROSSOVER_TOKENS: dict[str, dict[str, int]] = {
    "cpu": {"quest": 8192, "topk_exact": 1 << 20, "ann": 1 << 20, "tokenselect": 1 << 20, "centroids": 1 << 20},
}
_DEFAULT_CROSSOVER = 8192

# Options a selector named in ``SparseDecode(selector=...)`` gets unless ``selector_options`` says
# otherwise. Quest on 8-token pages: on 18 pass-key prompts of 2K tokens in nine families (forced
# sparse, budget 256) 16-token pages lost 2 of the 14 answers full attention gives (the key's last
# digits: " 6001." for 60031), 8-token pages kept all 14 at the cost of a step of about the same
# time (docs/token-policies.md). The selector's own default stays the paper's 16.
DECODE_SELECTOR_DEFAULTS: dict[str, dict] = {"quest": {"page_tokens": 8}}
_BUILD_STEP = 2048  # keys per piece of a background index build (a cancelled build stops after the current piece)


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
        selector_options: more options for the selector, over ``DECODE_SELECTOR_DEFAULTS`` (Quest
            decodes on 8-token pages unless ``page_tokens`` is given).
        record: keep the last selection of every layer in ``last_indices`` (``[B, H_kv, budget]``).
        dense_below: decode steps whose context is shorter than this many tokens run full attention
            (transformers' SDPA, as without the hook): below it, the selector's set-up and
            per-step overhead cost more than the tokens it saves. ``"auto"`` (default): the
            crossover measured for the selector (``CROSSOVER_TOKENS``, 32-token answers); ``0``:
            sparse whenever the context exceeds the budget.
        build: where a layer's selector state (page bounds, ANN indexes, k-means clusters) is
            built: ``"inline"`` (in the first sparse step, which waits for it), ``"background"``
            (in a worker thread started by that step; the layer decodes densely until the state is
            ready, so a short answer never waits for an index), or ``"auto"`` (default): background
            for selectors whose state is an index (``ann``, ``centroids``), inline otherwise.
        store: a ``kvstore.TieredStore`` to decode with the KV offloaded to (see the module
            docstring); its tiers must use ``paged`` or ``paged_int8``. Batch size 1, the Quest
            selector and no ``dense_layers``. The budget counts the tokens after the last stored
            block (held by the engine, attended in full) first; pages from the tiers fill the rest.
            The stored prefix is overwritten with zeros in the transformers cache, so attention
            provably reads it from the tiers only (transformers still allocates it).
        block_tokens: tokens per stored block (store mode).
        resident_tokens: the most recent tokens always kept resident and attended in full (store
            mode): a block is written once it ends at least this many tokens before the newest,
            so the tail the engine attends holds between ``resident_tokens`` and
            ``resident_tokens + block_tokens`` tokens.
        tier_options: more options for ``retrieval.TierAttention`` (``candidate_blocks``,
            ``candidate_groups``, ``page_cache_bytes``, ``summary_bytes``, ``prefetch``).
        prefill_budget: store mode: ``None`` (default) prefills in memory (full attention; the
            prompt is offloaded at the first decode step); an int streams the prefill into the
            store: feed the prompt in chunks (several forward calls with the same cache); at each
            chunk the full blocks that end at least ``resident_tokens`` before it are written to
            the store and zeroed in the cache, and the chunk attends the stored context through
            page selection (``TierAttention.prefill_layer``: ``prefill_budget`` tokens per KV
            head, scored by the chunk's last 64 queries) plus the resident tokens, causally.

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
    dense_below: int | str = "auto"
    build: str = "auto"
    store: Any = None
    block_tokens: int = 64
    resident_tokens: int = 64
    tier_options: dict = field(default_factory=dict)
    prefill_budget: int | None = None

    def __post_init__(self) -> None:
        from kvtier.retrieval import get_selector
        from kvtier.retrieval.selectors import SelectorBase

        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget <= 0:
            raise ValueError(f"budget must be a positive int (tokens per KV head), got {self.budget!r}")
        if not isinstance(self.dense_layers, int) or isinstance(self.dense_layers, bool) or self.dense_layers < 0:
            raise ValueError(f"dense_layers must be a non-negative int, got {self.dense_layers!r}")
        if isinstance(self.selector, str):
            opts = {**DECODE_SELECTOR_DEFAULTS.get(self.selector, {}), **self.selector_options}
            if self.num_sink is not None:
                opts["num_sink"] = self.num_sink
            if self.num_recent is not None:
                opts["num_recent"] = self.num_recent
            self._selector = get_selector(self.selector, **opts)
        elif isinstance(self.selector, SelectorBase):
            if self.num_sink is not None or self.num_recent is not None or self.selector_options:
                raise ValueError(
                    "num_sink, num_recent and selector_options go with a selector name; "
                    f"configure the {self.selector.name!r} instance itself instead"
                )
            self._selector = self.selector
        else:
            raise ValueError(f"selector must be a selector name or a retrieval selector instance, got {type(self.selector).__name__}")
        if self.dense_below != "auto" and (
            not isinstance(self.dense_below, int) or isinstance(self.dense_below, bool) or self.dense_below < 0
        ):
            raise ValueError(f"dense_below must be 'auto' or a non-negative int (tokens), got {self.dense_below!r}")
        if self.build not in ("auto", "inline", "background"):
            raise ValueError(f"build must be 'auto', 'inline' or 'background', got {self.build!r}")
        self._background = self.build == "background" or (self.build == "auto" and getattr(self._selector, "state_is_index", False))
        self._pool: ThreadPoolExecutor | None = None
        self._cancels: "weakref.WeakValueDictionary[int, threading.Event]" = weakref.WeakValueDictionary()
        kept = self._selector.num_sink + self._selector.num_recent
        if self.budget < kept:
            raise ValueError(f"budget must be at least num_sink + num_recent = {kept}, got {self.budget}")
        if self.store is not None:
            from kvtier.kvstore.store import TieredStore

            if not isinstance(self.store, TieredStore):
                raise ValueError(f"store must be a kvstore.TieredStore, got {type(self.store).__name__}")
            if self._selector.name != "quest":
                raise ValueError("with a store, decode selects pages hierarchically by Quest bounds: selector must be 'quest'")
            if not isinstance(self.block_tokens, int) or self.block_tokens <= 0 or self.block_tokens % 16:
                raise ValueError(f"block_tokens must be a positive multiple of 16, got {self.block_tokens!r}")
            if isinstance(self.resident_tokens, bool) or not isinstance(self.resident_tokens, int) or self.resident_tokens < 0:
                raise ValueError(f"resident_tokens must be a non-negative int, got {self.resident_tokens!r}")
        if self.prefill_budget is not None:
            if self.store is None:
                raise ValueError("prefill_budget streams a prefill into the store: give store= too")
            if isinstance(self.prefill_budget, bool) or not isinstance(self.prefill_budget, int) or self.prefill_budget < 16:
                raise ValueError(f"prefill_budget must be None or an int >= 16 (tokens per KV head), got {self.prefill_budget!r}")
        self.tier_attention: Any = None  # a retrieval.TierAttention, made at the first decode step (store mode)
        self._offloads: dict[int, tuple[weakref.ref, _Offload]] = {}
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
        for _, states in self._states.values():
            _cancel(states)
        for ev in list(self._cancels.values()):
            ev.set()
        self._states.clear()
        self.last_indices.clear()

    def crossover_tokens(self, device: torch.device | str = "cpu") -> int:
        """The context length from which decode steps go sparse on ``device`` (``dense_below`` resolved)."""
        if isinstance(self.dense_below, int):
            return self.dense_below
        table = CROSSOVER_TOKENS.get(torch.device(device).type, CROSSOVER_TOKENS["cpu"])
        base = table.get(getattr(self._selector, "name", ""), _DEFAULT_CROSSOVER)
        return base if self.budget <= 512 else base * self.budget // 512

    def wait_for_states(self, timeout: float | None = None) -> None:
        """Block until every background state build has finished (tests and benchmarks)."""
        for _, states in list(self._states.values()):
            for st in list(states.values()):
                if st.pending is not None:
                    st.pending.result(timeout)

    def _build(self, k: torch.Tensor, cancel: threading.Event):
        """A layer's selector state over ``k`` (in the worker thread): piece by piece when the selector
        can ``extend`` a state, checking ``cancel`` (the request ended) between pieces; else at once."""
        extend = getattr(self._selector, "extend", None)
        T = k.shape[2]
        if extend is None:
            return self._selector.prepare(k)
        state = self._selector.prepare(k[:, :, : min(T, _BUILD_STEP)])
        for a in range(_BUILD_STEP, T, _BUILD_STEP):
            if cancel.is_set():
                return None
            state = extend(state, k[:, :, : a + _BUILD_STEP])
        return state

    def _cancel_event(self, cache, states) -> threading.Event:
        """One event per request, set when its cache is garbage-collected: its builds stop early."""
        ev = self._cancels.get(id(states))
        if ev is None:
            ev = self._cancels[id(states)] = threading.Event()
            if cache is not None:
                weakref.finalize(cache, ev.set)
        return ev

    def _submit(self, fn, *args) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-sparse-state", initializer=_one_omp_thread)
        return self._pool.submit(fn, *args)

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
        if self.store is not None:
            return self._attend_tiered(module, query, key, value, attention_mask, cache=cache, T=T, scaling=scaling, **kwargs)
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
        t0 = time.perf_counter()
        stats = self._stats
        stats.decode_calls += 1
        k = key[:, :, :T]  # [B, H_kv, T, D] (a view)
        dense = T <= self.budget or layer < self.dense_layers or T < self.crossover_tokens(key.device)
        if not dense and st is None:
            if self._background:  # the keys so far: a view that stays valid (caches append by copy or after T)
                st = _LayerState(None, T - 1, self._submit(self._build, k[:, :, : T - 1], self._cancel_event(cache, states)))
                stats.background_builds += 1
            else:
                st = _LayerState(self._selector.prepare(k[:, :, : T - 1]), T - 1)
            stats.state_builds += 1
            if states is not None:
                states[layer] = st
        if not dense and st.pending is not None:
            if st.pending.done() and st.pending.result() is not None:
                st.selector_state, st.pending = st.pending.result(), None  # select() extends it to the new tokens
            else:
                dense = True  # never wait for an index: full attention until it is ready (a cancelled build: for good)
        if dense:  # one query, no padding (checked above): every one of the T cached tokens is visible, no mask needed
            out = sdpa(module, query, key[:, :, :T], value[:, :, :T], None, scaling=scaling, **kwargs)
            stats.dense_calls += 1
        else:
            from kvtier.sparse_attn import sparse_decode

            q = query[:, :, 0]  # [B, H_q, D]
            ids = self._selector.select(q, k, self.budget, st.selector_state)  # [B, H_kv, budget]
            o, _ = sparse_decode(q, key, value, ids, scale=scaling, check_indices=False)
            out = (o.unsqueeze(1).to(query.dtype), None)  # [B, 1, H_q, D]
            stats.sparse_calls += 1
            self._selected = self._selected + (ids >= 0).sum()
            stats.context_tokens += B * ids.shape[1] * T
            if self.record:
                self.last_indices[layer] = ids
        if st is not None:
            st.num_tokens = T
        stats.attention_seconds += time.perf_counter() - t0
        return out

    # -- store mode ------------------------------------------------------------------------------------
    def _attend_tiered(self, module, query, key, value, attention_mask, *, cache, T, scaling, **kwargs):
        B, H_q, n, D = query.shape
        layer = module.layer_idx
        off = self._offload_of(cache)
        if n > 1 and self.prefill_budget is None:
            if off is not None and off.num_tokens:
                raise ValueError(
                    "SparseDecode(store=...) cannot prefill more tokens once the context is offloaded (set prefill_budget to "
                    "stream a prefill into the store); start a new request (a new cache)"
                )
            return sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if n > 1:
            return self._prefill_tiered(module, query, key, value, cache=cache, T=T, scaling=scaling)
        if B != 1:
            raise ValueError(f"SparseDecode(store=...) decodes one sequence at a time, got a batch of {B}")
        if cache is None:
            raise ValueError("SparseDecode(store=...) needs the model's cache (call the model with past_key_values)")
        self._check_no_padding(attention_mask, T)
        t0 = time.perf_counter()
        stats = self._stats
        stats.decode_calls += 1
        if layer == 0:
            off = self._offload(cache, off, max(0, T - 1 - self.resident_tokens))
        stored = off.num_tokens
        k_tail = key[0, :, stored:T]  # [H_kv, W, D] tokens after the last stored block
        v_tail = value[0, :, stored:T]
        P = 16
        if layer < self.dense_layers:  # every stored page, read from the tiers like the others
            tier_budget = max(P, stored)
        else:
            tier_budget = max(P, (self.budget - k_tail.shape[1]) // P * P)
        o, _ = self.tier_attention.decode_layer(off.ctx, layer, query[0, :, 0], k_tail, v_tail, scale=scaling, budget=tier_budget)
        if stored > tier_budget:
            stats.sparse_calls += 1
            self._selected = self._selected + key.shape[1] * (tier_budget + k_tail.shape[1])
            stats.context_tokens += key.shape[1] * T
        stats.attention_seconds += time.perf_counter() - t0
        return o.to(query.dtype).view(1, 1, H_q, D), None

    def _prefill_tiered(self, module, query, key, value, *, cache, T, scaling):
        """A prefill chunk streamed into the store (``prefill_budget``)."""
        B, H_q, n, D = query.shape
        layer = module.layer_idx
        if B != 1:
            raise ValueError(f"SparseDecode(store=...) prefills one sequence at a time, got a batch of {B}")
        if cache is None:
            raise ValueError("SparseDecode(store=..., prefill_budget=...) needs the model's cache (call the model with past_key_values)")
        t0 = time.perf_counter()
        off = self._offload_of(cache)
        if layer == 0:
            off = self._offload(cache, off, max(0, T - n - self.resident_tokens))
        if off is None:
            raise RuntimeError("a prefill chunk reached a layer before layer 0")
        stored = off.num_tokens
        budget = max(16, stored) if layer < self.dense_layers else self.prefill_budget
        o, _ = self.tier_attention.prefill_layer(
            off.ctx, layer, query[0], key[0, :, stored:T], value[0, :, stored:T], scale=scaling, budget=budget
        )
        self._stats.attention_seconds += time.perf_counter() - t0
        return o.transpose(0, 1).unsqueeze(0).to(query.dtype), None  # [1, n, H_q, D]

    def _offload_of(self, cache) -> _Offload | None:
        entry = self._offloads.get(id(cache))
        return entry[1] if entry is not None and entry[0]() is cache else None

    def _offload(self, cache, off: _Offload | None, num_tokens: int) -> _Offload:
        """Write the full blocks of the first ``num_tokens`` cached tokens that are not yet stored."""
        import hashlib
        import os

        from kvtier.kvstore.spec import KVSpec
        from kvtier.retrieval.tier_attention import TierAttention

        layers = cache.layers
        k0 = layers[0].keys
        BT = self.block_tokens
        spec = KVSpec(
            "kvtier/sparse-decode", num_layers=len(layers), num_kv_heads=k0.shape[1], head_dim=k0.shape[3], dtype=k0.dtype, block_tokens=BT
        )
        if self.tier_attention is None or self.tier_attention.spec != spec:
            self.tier_attention = TierAttention(self.store, spec, budget=self.budget, **self.tier_options)
        if off is None:
            for k in [k for k, (ref, _) in self._offloads.items() if ref() is None]:
                del self._offloads[k]
            off = _Offload(self.tier_attention.open([]), os.urandom(16), 0)
            self._offloads[id(cache)] = (weakref.ref(cache), off)
        start, end = off.num_tokens, num_tokens // BT * BT
        if end <= start:
            return off
        n = (end - start) // BT
        kv = torch.stack([torch.stack([lay.keys[0, :, start:end], lay.values[0, :, start:end]]) for lay in layers])  # [L, 2, H, n*BT, D]
        blocks = kv.view(*kv.shape[:3], n, BT, kv.shape[-1]).permute(3, 0, 1, 2, 4, 5).contiguous()  # [n, L, 2, H, BT, D]
        first = start // BT
        keys = [hashlib.sha256(off.nonce + (first + i).to_bytes(8, "little")).digest() for i in range(n)]
        parent = off.ctx.keys[-1] if off.ctx.keys else None
        ok = self.store.put(spec, keys, blocks.cpu(), parent=parent)
        if not all(ok):
            raise RuntimeError(f"the store refused {ok.count(False)} of {n} blocks: no room in any tier")
        self.tier_attention.extend(off.ctx, keys)
        for lay in layers:  # the stored prefix now lives in the tiers only
            lay.keys[:, :, start:end].zero_()
            lay.values[:, :, start:end].zero_()
        off.num_tokens = end
        self._stats.offloaded_tokens += end - start
        return off

    def _request_states(self, cache) -> dict[int, _LayerState] | None:
        if cache is None:
            return None  # no cache: nothing persists between calls
        key = id(cache)
        entry = self._states.get(key)
        if entry is not None and entry[0]() is cache:
            return entry[1]
        for k in [k for k, (ref, _) in self._states.items() if ref() is None]:  # caches gone: their states go too
            _cancel(self._states.pop(k)[1])
        states: dict[int, _LayerState] = {}
        self._cancels.pop(id(states), None)  # an id reused from a finished request: its (set) event is not this one's
        self._states[key] = (weakref.ref(cache), states)
        return states

    @staticmethod
    def _check_no_padding(attention_mask, T: int) -> None:
        if attention_mask is None:
            return
        m = attention_mask[..., :T]
        ok = bool(m.all()) if m.dtype == torch.bool else bool((m == 0).all())
        if not ok:
            raise ValueError(
                "SparseDecode decodes batches of equal-length sequences without padding; the attention mask "
                "hides some cached tokens (a padded batch): decode such sequences separately"
            )


def _cancel(states: dict[int, _LayerState]) -> None:
    for st in states.values():
        if st.pending is not None:
            st.pending.cancel()


def _one_omp_thread() -> None:
    """The state-building thread runs faiss on one OpenMP thread: decode keeps the other cores."""
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:  # pragma: no cover - faiss is a dependency
        pass


from .hf_shared_prefix import shared_prefix_generate  # noqa: E402  (re-exported: one import for the connector)
from .hf_tokens import TokenPolicy  # noqa: E402

__all__ = ["SPARSE_ATTENTION", "SparseDecode", "SparseDecodeStats", "TokenPolicy", "shared_prefix_generate"]
