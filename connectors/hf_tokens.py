"""Greedy generation under a fast-tier token budget: ``eviction.tokens.EvictingKV`` inside a
transformers causal LM.

The model runs with ``use_cache=False`` and explicit position ids; its attention function hands
each layer's new queries, keys and values (after RoPE) to ``EvictingKV.step``, which appends them,
attends over the fast tier (plus, in ``demote`` mode, the demoted tokens a selector recalls) and
evicts when a head holds more than its trigger. The pieces are public so that benchmarks drive a
model through an ``EvictingKV`` the same way::

    kv = make_evicting_kv(model, Compressor("snapkv", budget=1024), mode="drop")
    with evicting_attention(model, kv):
        logits = forward_evicting(model, kv, ids, start=0)     # [1, V] (or [n, V] with all_logits)

``TokenPolicy`` is the whole loop (a ``TokenPolicyRuntime``: ``stream`` yields the greedy tokens one
at a time, ``generate`` collects them up to ``max_new_tokens`` or a stop token): chunked prefill
with eviction between chunks and greedy decode with a compression whenever the fast tier outgrows
its budget by ``compress_every`` tokens; or, with ``context_tokens=N``, one compression of the
first ``N`` tokens (the context) and the rest uncompressed. A prefix whose KV was loaded from
kvtier is appended as it is, the queries of its last ``window`` tokens recomputed
(``prefix_queries``) so that it compresses as if it had been prefilled here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .hf_dispatch import bind, model_dims

EVICTING_ATTENTION = "kvtier_evicting"


# -- the glue: a model's attention through an EvictingKV ------------------------------------------------
def make_evicting_kv(
    model,
    compressor,
    *,
    mode: str = "drop",
    observation_window: int = 64,
    trigger_tokens: int | None = None,
    recall=None,
    recall_budget: int = 256,
    max_demoted_tokens: int = 1 << 20,
):
    """An ``EvictingKV`` shaped for ``model`` (layers, heads, head dim, dtype and device from it)."""
    from kvtier.eviction.tokens import EvictingKV

    d = model_dims(model)
    p = next(model.parameters())
    return EvictingKV(
        compressor,
        num_layers=d.num_layers,
        num_q_heads=d.num_q_heads,
        num_kv_heads=d.num_kv_heads,
        head_dim=d.head_dim,
        mode=mode,
        observation_window=observation_window,
        trigger_tokens=trigger_tokens,
        recall=recall,
        recall_budget=recall_budget,
        max_demoted_tokens=max_demoted_tokens,
        dtype=p.dtype,
        device=p.device,
    )


def evicting_attention(model, kv) -> contextlib.AbstractContextManager:
    """Inside the block, the model's attention appends to and attends over ``kv`` (batch 1)."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        if query.shape[0] != 1:
            raise ValueError(f"EvictingKV runs one sequence: batch must be 1, got {query.shape[0]}")
        o = kv.step(module.layer_idx, query[0], key[0], value[0])  # [H_q, n, D]
        return o.transpose(0, 1).unsqueeze(0), None  # [1, n, H_q, D]

    return bind(model, EVICTING_ATTENTION, attention, sdpa_mask=False)


@torch.inference_mode()
def forward_evicting(model, ids: torch.Tensor | Sequence[int], start: int, *, all_logits: bool = False) -> torch.Tensor:
    """Run ``ids`` (one sequence, ``n`` tokens at positions ``start..start+n-1``) through the model
    inside ``evicting_attention``: logits ``[n, V]`` (``all_logits``) or ``[1, V]``, float32."""
    ids = torch.as_tensor(ids, dtype=torch.long).view(1, -1)
    n = ids.shape[1]
    out = model(
        input_ids=ids.to(model.device),
        position_ids=torch.arange(start, start + n, device=model.device).view(1, n),
        use_cache=False,
        logits_to_keep=0 if all_logits else 1,
    )
    return out.logits[0].float()


@torch.inference_mode()
def greedy_evicting(model, kv, ids: Sequence[int], start: int, max_new_tokens: int) -> list[int]:
    """Feed ``ids`` at ``start`` (one forward), then ``max_new_tokens`` greedy tokens, through ``kv``."""
    out: list[int] = []
    with evicting_attention(model, kv):
        logits = forward_evicting(model, ids, start)
        pos = start + len(ids)
        for i in range(max_new_tokens):
            nxt = int(logits[-1].argmax())
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = forward_evicting(model, [nxt], pos)
                pos += 1
    return out


# -- the runtime ---------------------------------------------------------------------------------------
@dataclass
class TokenPolicy:
    """Greedy generation with a token policy on the fast tier (a ``TokenPolicyRuntime``).

    Args:
        scorer: a registered scorer (``snapkv``, ``pyramidkv``, ``tova``, ``h2o``, ``knorm``,
            ``streaming_llm``, ``expected_attention``); ``scorer_options`` go to it.
        ratio: share of the sequence's tokens off the fast tier: after a compression a head holds
            ``total - floor(total * ratio)`` tokens of the ``total`` seen so far. Or ``budget``:
            tokens per KV head. Exactly one (``ratio=0.5`` when neither is given).
        mode: ``"drop"`` (evicted tokens are gone) or ``"demote"`` (they move to host memory and
            every later query recalls ``recall_budget`` of them per KV head through
            ``recall_selector``, LSE-merged with the fast tier).
        window: the observation window, the last queries the scorer sees.
        sink_tokens, window_tokens: the first and most recent tokens never evicted.
        chunk_tokens: prefill chunk; the fast tier is compressed to budget after every chunk, so a
            long prompt never holds more than ``budget + chunk_tokens`` tokens per head.
        compress_every: during decode, compress when a head exceeds its budget by this many tokens.
        head_budgets: ``"uniform"`` or ``"adaptive"`` (AdaKV).

    ``stream`` yields greedy token ids without end, ``generate`` collects ``max_new_tokens`` of them
    (fewer at a stop token); ``context_tokens=N`` compresses the first ``N`` prompt tokens once and
    keeps the rest. ``last_kv`` keeps the ``EvictingKV`` of the last call (its ``stats``, fast and
    demoted tokens).
    """

    scorer: str = "snapkv"
    ratio: float | None = None
    budget: int | None = None
    mode: str = "drop"
    recall_selector: str = "ann"
    recall_budget: int = 256
    window: int = 64
    sink_tokens: int = 4
    window_tokens: int = 64
    chunk_tokens: int = 256
    compress_every: int = 64
    head_budgets: str = "uniform"
    scorer_options: dict = field(default_factory=dict)
    recall_options: dict = field(default_factory=dict)
    max_demoted_tokens: int = 1 << 20

    def __post_init__(self) -> None:
        from kvtier.eviction.tokens import Compressor, get_scorer
        from kvtier.retrieval import get_selector

        if self.ratio is not None and self.budget is not None:
            raise ValueError(f"give one of ratio and budget, got ratio={self.ratio!r} and budget={self.budget!r}")
        if self.ratio is None and self.budget is None:
            self.ratio = 0.5
        if self.ratio is not None and (
            not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool) or not 0.0 <= self.ratio < 1.0
        ):
            raise ValueError(f"ratio must be a share of tokens evicted in [0, 1), got {self.ratio!r}")
        for name in ("window", "chunk_tokens", "compress_every", "recall_budget", "max_demoted_tokens") + (
            ("budget",) if self.budget is not None else ()
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.mode not in ("drop", "demote"):
            raise ValueError(f"mode must be 'drop' or 'demote', got {self.mode!r}")
        get_scorer(self.scorer, **self.scorer_options)  # validates the name and options now
        Compressor(
            get_scorer(self.scorer, **self.scorer_options),
            budget=1,
            sink_tokens=self.sink_tokens,
            window_tokens=self.window_tokens,
            head_budgets=self.head_budgets,
        )
        if self.mode == "demote":
            get_selector(self.recall_selector, **self._recall_options())
        self.last_kv = None

    def _recall_options(self) -> dict:
        return {"num_sink": 0, "num_recent": 0, **self.recall_options}  # sinks and window stay on the fast tier

    def target(self, total: int) -> int:
        """Tokens per KV head the fast tier keeps after a compression, ``total`` tokens seen."""
        if self.budget is not None:
            return self.budget
        assert self.ratio is not None  # the constructor takes a budget or a ratio
        return max(1, total - math.floor(total * self.ratio))

    def new_kv(self, model):
        """A fresh ``EvictingKV`` for one sequence on ``model`` with this policy."""
        from kvtier.eviction.tokens import Compressor, get_scorer
        from kvtier.retrieval import get_selector

        comp = Compressor(
            get_scorer(self.scorer, **self.scorer_options),
            budget=self.target(1),
            sink_tokens=self.sink_tokens,
            window_tokens=self.window_tokens,
            head_budgets=self.head_budgets,
        )
        recall = get_selector(self.recall_selector, **self._recall_options()) if self.mode == "demote" else None
        return make_evicting_kv(
            model,
            comp,
            mode=self.mode,
            observation_window=self.window,
            recall=recall,
            recall_budget=self.recall_budget,
            max_demoted_tokens=self.max_demoted_tokens,
        )

    def _set_budget(self, kv, total: int, slack: int) -> None:
        b = self.target(total)
        kv.compressor.budget = b
        kv.trigger_tokens = b + slack

    def generate(
        self,
        model,
        input_ids: Sequence[int],
        *,
        max_new_tokens: int,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        num_prefix_tokens: int = 0,
        context_tokens: int | None = None,
        stop_tokens: Sequence[int] = (),
    ) -> list[int]:
        """Greedy tokens after ``input_ids``: ``max_new_tokens`` of them, or fewer when one of
        ``stop_tokens`` comes (it is included). The arguments are ``stream``'s."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        stops = set(_check_ids("stop_tokens", list(stop_tokens), allow_empty=True))
        it = self.stream(model, input_ids, prefix_kv=prefix_kv, num_prefix_tokens=num_prefix_tokens, context_tokens=context_tokens)
        out: list[int] = []
        try:
            while len(out) < max_new_tokens:
                out.append(next(it))
                if out[-1] in stops:
                    break
        finally:
            close = getattr(it, "close", None)  # a generator's close() ends its evicting attention
            if close is not None:
                close()
        return out

    def stream(
        self,
        model,
        input_ids: Sequence[int],
        *,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        num_prefix_tokens: int = 0,
        context_tokens: int | None = None,
    ) -> Iterator[int]:
        """Greedy token ids after ``input_ids``, one per ``next()``, without end (a ``TokenPolicyRuntime``).

        The arguments are validated here, before the iterator is returned. The first
        ``num_prefix_tokens`` come with their KV in ``prefix_kv`` (per layer ``(k, v)``
        ``[1, H_kv, >= num_prefix_tokens, D]``, computed with full attention) and are not recomputed
        (all of them but the last when the prefix is the whole prompt: its logits are needed); the
        queries of the prefix's last ``window`` tokens, which the scorer's observation window needs
        and a cache does not hold, are recomputed from it (one forward of ``window`` tokens), so that
        a cached prefix compresses as the same prefix prefilled here.

        ``context_tokens=None``: streaming, the whole prompt in chunks with a compression after every
        chunk, and during decode whenever the fast tier outgrows its budget by ``compress_every``.
        ``context_tokens=N``: the first ``N`` tokens are prefilled without eviction and compressed
        once (budget ``target(N)``, observation window: the context's last ``window`` queries), then
        the rest of the prompt and the answer run on the compressed context without further eviction
        (kvpress's pipeline: query-agnostic compression of the context, the question uncompressed).
        """
        ids = _check_ids("input_ids", input_ids)
        d = model_dims(model)
        P = check_prefix_kv(prefix_kv, num_prefix_tokens, len(ids), d)
        N = check_context_tokens(context_tokens, len(ids))
        P = min(P, len(ids) - 1, len(ids) if N is None else N)
        return self._stream(model, ids, prefix_kv, P, N, d)

    @torch.inference_mode()
    def _stream(self, model, ids: list[int], prefix_kv, P: int, N: int | None, d) -> Iterator[int]:
        kv = self.new_kv(model)
        self.last_kv = kv
        end = len(ids) if N is None else N  # the tokens prefilled before the (first) compression
        first = min(self.chunk_tokens, end - P) if N is None else end - P  # forwarded before the first compression
        need = min(P, max(0, self.window - first))  # window queries the prefix must supply
        queries = prefix_queries(model, prefix_kv, ids, P - need, P) if need else None
        for layer in range(d.num_layers) if P else ():
            k, v = prefix_kv[layer]
            kv.append(layer, k[0, :, :P], v[0, :, :P], None if queries is None else queries[layer])
        with evicting_attention(model, kv):
            pos, logits = P, None
            for a in range(P, end, self.chunk_tokens):
                chunk = ids[a : min(a + self.chunk_tokens, end)]
                if N is None:
                    self._set_budget(kv, pos + len(chunk), 0)
                logits = forward_evicting(model, chunk, pos)
                pos += len(chunk)
            if N is not None:  # one compression of the context, then the question on top of it
                kv.compressor.budget, kv.trigger_tokens = self.target(N), None
                kv.compress()
                if N < len(ids):
                    logits = forward_evicting(model, ids[N:], pos)
                    pos = len(ids)
            assert logits is not None  # at least one token was forwarded (a prompt is never empty)
            while True:
                nxt = int(logits[-1].argmax())
                yield nxt
                if N is None:
                    self._set_budget(kv, pos + 1, self.compress_every)
                logits = forward_evicting(model, [nxt], pos)
                pos += 1


# -- the prefix's window queries -------------------------------------------------------------------------
PREFIX_QUERIES = "kvtier_prefix_queries"


@torch.inference_mode()
def prefix_queries(model, prefix_kv, ids: Sequence[int], start: int, end: int) -> list[torch.Tensor]:
    """The queries (after RoPE) of tokens ``start .. end - 1``, per layer ``[H_q, end - start, D]``:
    one forward of those tokens over the cached KV of tokens ``0 .. start - 1`` (``prefix_kv``, per
    layer ``(k, v)`` ``[1, H_kv, >= start, D]``), full attention; nothing is appended anywhere.

    A cache holds keys and values, not queries; a scorer's observation window needs the queries of
    the last tokens, and these are the ones a full prefill of the prefix computes."""
    from transformers import DynamicCache

    from .hf_dispatch import sdpa

    cache = DynamicCache(config=model.config)
    if start:
        for layer, (k, v) in zip(cache.layers, prefix_kv):
            layer.lazy_initialization(k[:, :, :start], v[:, :, :start])
            layer.keys, layer.values = k[:, :, :start].contiguous(), v[:, :, :start].contiguous()
    out: dict[int, torch.Tensor] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        out[module.layer_idx] = query[0].clone()  # [H_q, n, D]
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    n = end - start
    with bind(model, PREFIX_QUERIES, attention, sdpa_mask=True):
        model(
            input_ids=torch.tensor([list(ids[start:end])], device=model.device),
            past_key_values=cache,
            position_ids=torch.arange(start, end, device=model.device).view(1, n),
            use_cache=True,
            logits_to_keep=1,
        )
    return [out[i] for i in range(len(out))]


# -- validation shared with the other connectors ----------------------------------------------------------
def _check_ids(name: str, ids, *, allow_empty: bool = False) -> list[int]:
    from .hf_cache import _token_list

    ids = _token_list(ids, name)
    if not ids and not allow_empty:
        raise ValueError(f"{name} must hold at least one token, got none")
    return list(ids)


def check_prefix_kv(prefix_kv, num_prefix_tokens: int, num_tokens: int, dims) -> int:
    """Validate a prefix's KV (per layer ``(k, v)`` ``[1, H_kv, T >= num_prefix_tokens, D]``); returns
    ``num_prefix_tokens``."""
    if not isinstance(num_prefix_tokens, int) or isinstance(num_prefix_tokens, bool) or not 0 <= num_prefix_tokens <= num_tokens:
        raise ValueError(f"num_prefix_tokens must be an int in [0, {num_tokens}] (the prompt's length), got {num_prefix_tokens!r}")
    if num_prefix_tokens == 0:
        return 0
    if not isinstance(prefix_kv, (list, tuple)) or len(prefix_kv) != dims.num_layers:
        raise ValueError(
            f"prefix_kv must be a list of {dims.num_layers} (k, v) pairs (one per layer) for {num_prefix_tokens} "
            f"prefix tokens, got {type(prefix_kv).__name__}{'' if prefix_kv is None else f' of {len(prefix_kv)}'}"
        )
    for i, pair in enumerate(prefix_kv):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"prefix_kv[{i}] must be a (k, v) pair, got {type(pair).__name__}")
        for name, t in zip("kv", pair):
            ok = (
                isinstance(t, torch.Tensor)
                and t.dim() == 4
                and t.shape[0] == 1
                and t.shape[1] == dims.num_kv_heads
                and t.shape[2] >= num_prefix_tokens
                and t.shape[3] == dims.head_dim
                and t.is_floating_point()
            )
            if not ok:
                raise ValueError(
                    f"prefix_kv[{i}].{name} must be a float tensor [1, {dims.num_kv_heads}, >= {num_prefix_tokens}, "
                    f"{dims.head_dim}], got {list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                )
    return num_prefix_tokens


def check_context_tokens(context_tokens, num_tokens: int) -> int | None:
    """``None`` or an int in ``[1, num_tokens]`` (the prompt's length)."""
    if context_tokens is None:
        return None
    if not isinstance(context_tokens, int) or isinstance(context_tokens, bool) or not 1 <= context_tokens <= num_tokens:
        raise ValueError(f"context_tokens must be None or an int in [1, {num_tokens}] (the prompt's length), got {context_tokens!r}")
    return context_tokens
