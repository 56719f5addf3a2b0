"""``generate()``: generate with any transformers causal LM through kvtier, in one call.

    from kvtier.connectors.generate import generate
    r = generate(model, "... a long document ... Question?", tokenizer=tok, kv=store, max_new_tokens=32)
    r.text, r.ttft_s, r.num_cached_tokens, r.tier_hits      # second call over the same document: cached prefix

One request, batch 1: look up the prompt's longest cached prefix in kvtier and load it
(``KVTierCache``), prefill the rest (in chunks of ``chunk_tokens`` if given), pick the first token,
save the prompt's new full blocks, then decode (greedy unless ``temperature > 0``), saving each
block as it completes. With neither ``store`` nor ``client`` it runs the same code on a plain
``DynamicCache``: the baseline without kvtier.

Two hooks, specified in ``service/connectors/protocols.py``:

- ``attention=``: an ``AttentionHook``, any object with ``attach(model)`` returning a context
  manager; every forward call of the request runs inside it (sparse decode plugs in here);
- ``policy=``: a ``TokenPolicyRuntime`` (e.g. ``hf_tokens.TokenPolicy``), any object with ``stream(model,
  input_ids, *, prefix_kv, num_prefix_tokens, context_tokens) -> Iterator[int]``. With kvtier,
  ``generate`` then loads the cached prefix, prefills the prompt's remaining full blocks with full
  attention (all of them, whether or not ``save`` writes them: a cache hit changes nothing but the
  time) and hands the policy that KV (per layer ``(k, v)`` ``[1, H_kv, T, D]``) to run the rest of
  the request under its own cache (token eviction plugs in here); it pulls the policy's tokens one at a
  time, so stop tokens end the request as without a policy.

``context_tokens=N`` says where the context ends: under a policy only the first ``N`` prompt tokens
are compressed (once), and the rest of the prompt (the question) and the answer run uncompressed on
top of them, as kvpress does; with kvtier only the context's full blocks are loaded, prefilled and
saved. Without a policy it changes nothing (every token is kept anyway).

Timings: ``ttft_s`` from the call to the first token (lookup, load, prefill, compression); ``decode_s``
from the first token to the last (saves included); ``decode_tokens_per_s`` = tokens after the first
/ ``decode_s``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from kvtier.kvstore import KVSpec

from .hf_cache import CacheStats, KVTierCache, _token_list
from .protocols import AttentionHook, TokenPolicyRuntime


@dataclass
class GenerateResult:
    token_ids: list[int]  # the generated tokens (the prompt not included)
    text: str | None  # their text, when a tokenizer was given
    ttft_s: float  # lookup + load + prefill (+ compression under a policy) + first token (the save that follows is not in it)
    total_s: float  # the whole call
    decode_s: float  # decode steps after the first token, saves included
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens loaded from kvtier instead of prefilled
    cache: CacheStats | None = None  # kvtier's side: hits and bytes per tier, blocks saved (None without kvtier)
    finish_reason: str = "length"  # "length" or "stop" (a stop token)

    @property
    def num_prefilled_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_cached_tokens

    @property
    def tier_hits(self) -> dict[str, int]:
        return dict(self.cache.tier_hits) if self.cache else {}

    @property
    def tier_bytes(self) -> dict[str, int]:
        return dict(self.cache.tier_bytes) if self.cache else {}

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = len(self.token_ids) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None


def _prompt_ids(prompt, tokenizer) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs tokenizer=")
        ids = tokenizer(prompt).input_ids
    else:
        ids = _token_list(prompt, "input_ids")
    if not ids:
        raise ValueError("the prompt is empty: a request needs at least one token")
    return list(ids)


def _stop_tokens(model, tokenizer, stop_tokens) -> set[int]:
    if stop_tokens is not None:
        return set(_token_list(list(stop_tokens), "stop_tokens"))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


@torch.inference_mode()
def _forward(model, cache, ids: Sequence[int]) -> torch.Tensor:
    """Feed ``ids`` after what the cache holds; the logits ``[V]`` after the last one."""
    device = next(model.parameters()).device
    out = model(
        input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device), past_key_values=cache, use_cache=True, logits_to_keep=1
    )
    return out.logits[0, -1].float()


def _prefill(model, cache, ids: Sequence[int], chunk_tokens: int | None) -> torch.Tensor | None:
    step = chunk_tokens or max(len(ids), 1)
    logits = None
    for start in range(0, len(ids), step):
        logits = _forward(model, cache, ids[start : start + step])
    return logits


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(
    model,
    input_ids_or_text,
    *,
    tokenizer=None,
    kv=None,
    store=None,
    client=None,
    backend=None,
    spec: KVSpec | None = None,
    tenant: str = "",
    salt: str = "",
    extra_keys: Sequence[str] = (),
    max_new_tokens: int = 32,
    chunk_tokens: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    stop_tokens: Sequence[int] | None = None,
    save: bool = True,
    attention: AttentionHook | None = None,
    policy: TokenPolicyRuntime | None = None,
    context_tokens: int | None = None,
) -> GenerateResult:
    """Generate up to ``max_new_tokens`` tokens after a prompt, reusing and filling kvtier's cache.

    Args:
        model: any transformers causal LM with full-attention layers (batch 1 here).
        input_ids_or_text: token ids ``[T]`` / ``[1, T]`` (list, tensor) or a text (needs ``tokenizer``).
        tokenizer: turns a text prompt into ids and the answer into ``text``.
        kv: where the blocks live: a ``kvstore.TieredStore`` in this process, a
            ``service.client.KVTierClient`` of a running service, or any ``KVBackend``; None: no kvtier.
        store / client / backend: deprecated spellings of ``kv`` (at most one of the four).
        spec: the blocks' ``KVSpec`` (default ``model_spec(model)``: float16 blocks of 256 tokens).
        tenant, salt, extra_keys: the keys' namespace (``tenant`` in process only).
        chunk_tokens: prefill the uncached part this many tokens at a time (default: at once).
        temperature: 0 (default) decodes greedily; above 0 samples (with ``generator``).
        stop_tokens: stop after any of these (default: the model's EOS ids; ``()``: never).
        save: write the request's new full blocks into kvtier (False: read only).
        attention: ``AttentionHook``; every forward call runs inside ``attention.attach(model)``.
        policy: ``TokenPolicyRuntime`` that runs the request after the cached prefix is loaded.
        context_tokens: the prompt's first ``context_tokens`` tokens are the context, the rest the
            question: a policy compresses the context only (see the module docstring).
    """
    ids = _prompt_ids(input_ids_or_text, tokenizer)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    if attention is not None and not callable(getattr(attention, "attach", None)):
        raise ValueError(f"attention must have attach(model) returning a context manager, got {type(attention).__name__}")
    if policy is not None and not callable(getattr(policy, "stream", None)):
        raise ValueError(f"policy must have stream(model, input_ids, ...) (a TokenPolicyRuntime), got {type(policy).__name__}")
    if context_tokens is not None and (
        not isinstance(context_tokens, int) or isinstance(context_tokens, bool) or not 1 <= context_tokens <= len(ids)
    ):
        raise ValueError(f"context_tokens must be None or an int in [1, {len(ids)}] (the prompt's length), got {context_tokens!r}")
    stops = _stop_tokens(model, tokenizer, stop_tokens)
    use_kvtier = any(x is not None for x in (kv, store, client, backend))

    t0 = time.perf_counter()
    if use_kvtier:
        cache = KVTierCache(
            model, kv=kv, store=store, client=client, backend=backend, spec=spec, tenant=tenant, salt=salt, extra_keys=extra_keys, save=save
        )
        # under a policy a prefix never reaches past the context: the question runs on the compressed context
        limit = len(ids) if policy is None or context_tokens is None or context_tokens == len(ids) else context_tokens + 1
        num_cached = cache.load_prefix(ids[:limit])
    else:
        from transformers import DynamicCache

        cache, num_cached = DynamicCache(config=model.config), 0
    context = attention.attach(model) if attention is not None else nullcontext()

    with context:
        if policy is not None:
            return _run_policy(
                model, policy, cache, ids, num_cached, max_new_tokens, chunk_tokens, tokenizer, t0, use_kvtier, context_tokens, stops
            )
        logits = _prefill(model, cache, ids[num_cached:], chunk_tokens)
        tokens = [_pick(logits, temperature, generator)]
        ttft = time.perf_counter() - t0
        if use_kvtier:
            cache.save()
        t1 = time.perf_counter()
        finish = "stop" if tokens[-1] in stops else "length"
        while finish == "length" and len(tokens) < max_new_tokens:
            if use_kvtier:
                cache.append_tokens(tokens[-1:])
            logits = _forward(model, cache, tokens[-1:])
            if use_kvtier:
                cache.save()
            tokens.append(_pick(logits, temperature, generator))
            if tokens[-1] in stops:
                finish = "stop"
        t2 = time.perf_counter()
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
    return GenerateResult(tokens, text, ttft, t2 - t0, t2 - t1, len(ids), num_cached, cache.stats if use_kvtier else None, finish)


def _run_policy(
    model, policy, cache, ids, num_cached, max_new_tokens, chunk_tokens, tokenizer, t0, use_kvtier, context_tokens, stops
) -> GenerateResult:
    """Prefill (and save) the prompt's uncached full blocks (all but the last token's, none past the
    context) with full attention, then pull the policy's tokens until a stop token or ``max_new_tokens``."""
    num_prefix = num_cached
    if use_kvtier:
        bt = cache.spec.block_tokens
        num_prefix = min(len(ids) - 1, len(ids) if context_tokens is None else context_tokens) // bt * bt
        if num_prefix > num_cached:
            _prefill(model, cache, ids[num_cached:num_prefix], chunk_tokens)
            cache.save()  # a no-op with save=False
    prefix_kv = cache.prefix_kv() if use_kvtier and num_prefix else None
    stream = policy.stream(
        model, list(ids), prefix_kv=prefix_kv, num_prefix_tokens=num_prefix if prefix_kv is not None else 0, context_tokens=context_tokens
    )
    tokens: list[int] = []
    finish, t1 = "length", None
    try:
        for t in stream:  # a policy whose stream ends early ends the request ("length")
            tokens.append(int(t))
            if t1 is None:
                t1 = time.perf_counter()
            if tokens[-1] in stops:
                finish = "stop"
                break
            if len(tokens) == max_new_tokens:
                break
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    t2 = time.perf_counter()
    if t1 is None:
        raise RuntimeError(f"the policy {type(policy).__name__} streamed no token")
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
    return GenerateResult(tokens, text, t1 - t0, t2 - t0, t2 - t1, len(ids), num_cached, cache.stats if use_kvtier else None, finish)


@dataclass
class SharedPrefixResult:
    """What ``generate_shared_prefix`` returns: one answer per suffix, and how the prefix was had."""

    token_ids: list[list[int]]
    texts: list[str] | None
    num_prefix_tokens: int
    num_cached_tokens: int  # of the prefix, loaded from kvtier
    prefix_s: float  # lookup + load + prefill of the rest of the prefix (+ save)
    decode_s: float  # the suffixes' prefill and the batch decode
    cache: CacheStats | None


def generate_shared_prefix(
    model,
    prefix,
    suffixes,
    *,
    tokenizer=None,
    kv=None,
    store=None,
    client=None,
    backend=None,
    spec=None,
    tenant: str = "",
    salt: str = "",
    extra_keys: Sequence[str] = (),
    max_new_tokens: int = 32,
    chunk_tokens: int | None = None,
    save: bool = True,
    attention: str = "shared",
) -> SharedPrefixResult:
    """A batch of requests that share ``prefix`` (ids or text), one per entry of ``suffixes``, greedy.

    The prefix's longest cached part is loaded from kvtier (``kv`` as in
    ``generate``; none: computed), the rest of it prefilled once and its new full blocks saved; then
    ``hf_shared_prefix.shared_prefix_generate`` decodes the batch with the prefix held once
    (``attention="shared"``: Hydragen's ``shared_prefix_decode``; ``"per_sequence"``: the prefix
    copied into every sequence, the baseline). Each answer equals greedy ``generate`` of
    ``prefix + suffix`` alone (up to float rounding), ``max_new_tokens`` tokens each (no early stop).
    """
    from .hf_shared_prefix import shared_prefix_generate

    prefix_ids = _prompt_ids(prefix, tokenizer)
    if not isinstance(suffixes, (list, tuple)) or not suffixes:
        raise ValueError(f"suffixes must be a non-empty list of token-id lists or texts, got {type(suffixes).__name__}")
    suffix_ids = [_prompt_ids(s, tokenizer) for s in suffixes]
    use_kvtier = any(x is not None for x in (kv, store, client, backend))
    t0 = time.perf_counter()
    prefix_kv, num_cached, stats = None, 0, None
    if use_kvtier:
        cache = KVTierCache(
            model, kv=kv, store=store, client=client, backend=backend, spec=spec, tenant=tenant, salt=salt, extra_keys=extra_keys, save=save
        )
        # the whole prefix is context here (the suffixes follow it): its last token may be loaded too
        num_cached = cache.load_prefix(prefix_ids + suffix_ids[0][:1])
        if num_cached < len(prefix_ids):
            _prefill(model, cache, prefix_ids[num_cached:], chunk_tokens)
        if save:
            cache.save()
        prefix_kv, stats = cache.prefix_kv(), cache.stats
    t1 = time.perf_counter()
    out = shared_prefix_generate(model, prefix_ids, suffix_ids, max_new_tokens=max_new_tokens, prefix_kv=prefix_kv, attention=attention)
    t2 = time.perf_counter()
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out] if tokenizer is not None else None
    return SharedPrefixResult(out, texts, len(prefix_ids), num_cached, t1 - t0, t2 - t1, stats)
