"""KVTierCache and generate(): a transformers cache backed by kvtier, on a tiny random Llama.

The model is built in the test (2 layers, hidden 64, 4 query heads, 2 KV heads, head dim 16) and
blocks hold 16 tokens, so every test runs in well under a second of model time.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvtier.kvstore import DiskTier, HostTier, KVSpec, Namespace, TierConfig, TieredStore, chain_hashes  # noqa: E402
from kvtier.service.client import KVTierClient  # noqa: E402
from kvtier.connectors.generate import generate  # noqa: E402
from kvtier.connectors.hf_cache import CacheStats, KVTierCache, StoreBackend, model_spec  # noqa: E402
from kvtier.connectors.protocols import AttentionHook, TokenPolicyRuntime  # noqa: E402

BT = 16
SPEC32 = KVSpec("tiny-llama-test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_tokens=BT)
SPEC16 = KVSpec("tiny-llama-test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=BT)


def tiny_config(**kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        **kw,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture
def store():
    s = TieredStore([HostTier(1 << 24)])
    yield s
    s.close()


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def plain_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(config=model.config), use_cache=True).logits[0, -1]


class CountingInputs:
    """Records how many tokens each forward call feeds (a hook on the embedding)."""

    def __init__(self, model) -> None:
        self.calls: list[int] = []
        self._h = model.get_input_embeddings().register_forward_hook(lambda m, args, out: self.calls.append(args[0].shape[-1]))

    def close(self) -> None:
        self._h.remove()


# -- prefix reuse is exact ------------------------------------------------------------------
def test_cached_prefix_gives_the_logits_and_greedy_tokens_of_a_plain_cache(model, store):
    ids = prompt(100)
    base = generate(model, ids, max_new_tokens=24, stop_tokens=())
    cold = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=24, stop_tokens=())
    warm = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=24, stop_tokens=())
    assert cold.num_cached_tokens == 0 and warm.num_cached_tokens == 96
    assert warm.token_ids == cold.token_ids == base.token_ids

    cache = KVTierCache(model, kv=store, spec=SPEC32)
    assert cache.load_prefix(ids) == 96
    with torch.inference_mode():
        got = model(input_ids=torch.tensor([ids[96:]]), past_key_values=cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(got, plain_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_float16_blocks_load_in_the_model_dtype(model, store):
    ids = prompt(80, seed=1)
    generate(model, ids, kv=store, spec=SPEC16, max_new_tokens=1)
    cache = KVTierCache(model, kv=store, spec=SPEC16)
    assert cache.load_prefix(ids) == 64
    assert cache.layers[0].keys.dtype == torch.float32 and cache.layers[0].keys.shape == (1, 2, 64, 16)
    with torch.inference_mode():
        got = model(input_ids=torch.tensor([ids[64:]]), past_key_values=cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(got, plain_logits(model, ids), rtol=0, atol=5e-3)  # float16 rounding of K and V only


def test_second_request_loads_the_blocks_and_prefills_only_the_rest(model, store):
    ids = prompt(100, seed=2)
    counter = CountingInputs(model)
    try:
        generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=3, stop_tokens=(), chunk_tokens=40)
        assert counter.calls == [40, 40, 20, 1, 1]  # chunked prefill, then two decode steps
        counter.calls.clear()
        r = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=3, stop_tokens=())
        assert counter.calls == [4, 1, 1] and r.num_prefilled_tokens == 4
        counter.calls.clear()
        # a request sharing only the first 70 tokens reuses the 4 blocks they fill
        other = ids[:70] + prompt(30, seed=3)
        r = generate(model, other, kv=store, spec=SPEC32, max_new_tokens=1)
        assert r.num_cached_tokens == 64 and counter.calls == [36]
    finally:
        counter.close()
    assert r.cache.num_lookup_blocks == 6 and r.cache.num_hit_blocks == 4 and r.cache.num_loaded_blocks == 4


def test_the_last_prompt_token_is_never_loaded(model, store):
    ids = prompt(64, seed=4)  # exactly 4 blocks
    generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=2, stop_tokens=())
    r = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=1)
    assert r.num_cached_tokens == 48 and r.num_prefilled_tokens == 16
    assert r.cache.num_lookup_blocks == 3 and r.cache.num_hit_blocks == 3


def test_only_full_blocks_are_saved_with_the_chain_keys(model, store):
    ids = prompt(40, seed=5)
    r = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=30, stop_tokens=())
    fed = ids + r.token_ids[:-1]  # the last token is never fed: its KV does not exist
    assert len(fed) == 69 and r.cache.num_saved_blocks == 4  # 69 tokens: 4 full blocks, 5 tokens stay out
    keys = chain_hashes(SPEC32, fed)
    assert len(keys) == 4 and store.lookup(SPEC32, keys).num_blocks == 4
    assert store.stats()["blocks"] == 4
    # the stored blocks are the KV of exactly those tokens
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([fed[:64]]), past_key_values=cache, use_cache=True)
    for b, block in enumerate(store.get(SPEC32, keys)):
        assert block.shape == SPEC32.block_shape
        torch.testing.assert_close(block[0, 0], cache.layers[0].keys[0, :, b * BT : (b + 1) * BT], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(block[1, 1], cache.layers[1].values[0, :, b * BT : (b + 1) * BT], rtol=1e-4, atol=1e-5)


def test_blocks_completed_during_decode_are_saved_and_reused(model, store):
    ids = prompt(20, seed=6)
    first = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=40, stop_tokens=())
    follow_up = ids + first.token_ids + prompt(5, seed=7)  # the next turn of a chat: history + new message
    r = generate(model, follow_up, kv=store, spec=SPEC32, max_new_tokens=1)
    assert r.num_cached_tokens == 48  # 20 + 39 fed = 59 tokens: 3 blocks saved while decoding and after prefill


def test_namespace_separates_chains(model, store):
    ids = prompt(50, seed=8)
    generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=1, salt="a")
    assert generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=1, salt="b").num_cached_tokens == 0
    assert generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=1, tenant="t").num_cached_tokens == 0
    assert generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=1, salt="a").num_cached_tokens == 48
    assert store.lookup(SPEC32, chain_hashes(SPEC32, ids, Namespace(salt="a"))).num_blocks == 3


def test_transformers_generate_runs_on_the_cache(model, store):
    ids = torch.tensor([prompt(50, seed=9)])
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for expect_cached in (0, 48):
        cache = KVTierCache(model, kv=store, spec=SPEC32)
        assert cache.load_prefix(ids) == expect_cached
        out = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out, plain)
        cache.append_tokens(out[0, 50:-1])
        cache.save()
    assert store.stats()["blocks"] == 3


# -- per-tier counters ------------------------------------------------------------------------
def test_hits_and_bytes_per_tier(model, tmp_path):
    # a host tier for 3 blocks (above its watermark the oldest go down to the disk)
    store = TieredStore(
        [TierConfig(HostTier(3 * SPEC32.block_nbytes + 4096), high_watermark=1.0, low_watermark=1.0), DiskTier(tmp_path, 1 << 24)]
    )
    try:
        ids = prompt(110, seed=10)
        generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=1)
        keys = chain_hashes(SPEC32, ids)[:6]
        where = store.lookup(SPEC32, keys).tier_hits
        assert where["host"] >= 1 and where["disk"] >= 1 and sum(where.values()) == 6
        r = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=1)
        assert r.num_cached_tokens == 96
        assert r.tier_hits == where
        assert r.tier_bytes == {k: v * SPEC32.block_nbytes for k, v in where.items()}
        total = r.cache + r.cache
        assert total.tier_hits == {k: 2 * v for k, v in where.items()} and total.num_loaded_blocks == 12
    finally:
        store.close()


# -- the service through the SDK ----------------------------------------------------------------
def test_service_backend_against_a_real_service(model, open_server):
    ids = prompt(90, seed=11)
    with KVTierClient(open_server.url) as client:
        base = generate(model, ids, max_new_tokens=12, stop_tokens=())
        cold = generate(model, ids, kv=client, spec=SPEC32, salt="hf-cache-test", max_new_tokens=12, stop_tokens=())
        warm = generate(model, ids, kv=client, spec=SPEC32, salt="hf-cache-test", max_new_tokens=12, stop_tokens=())
        assert cold.num_cached_tokens == 0 and warm.num_cached_tokens == 80
        assert warm.token_ids == cold.token_ids == base.token_ids
        assert sum(warm.tier_hits.values()) == 5 and sum(warm.tier_bytes.values()) == 5 * SPEC32.block_nbytes
        assert set(warm.tier_hits) <= {"device", "host", "disk"}
        # the keys the cache put under are the service's own chain for this tenant and salt
        model_id = client.register_spec(SPEC32)
        fed = ids + cold.token_ids[:-1]
        assert client.lookup(model_id, token_ids=fed, salt="hf-cache-test").num_blocks == len(fed) // BT
        # another salt: nothing
        assert generate(model, ids, kv=client, spec=SPEC32, salt="other", max_new_tokens=1).num_cached_tokens == 0


# -- the hooks for sparse decode and token eviction -----------------------------------------------
class RecordingAttention:
    """An AttentionHook that records the forward calls made inside its context."""

    def __init__(self) -> None:
        self.inside = False
        self.entries = 0
        self.calls_inside = 0

    @contextmanager
    def _ctx(self, model):
        handle = model.get_input_embeddings().register_forward_hook(lambda *a: self._seen())
        self.inside, self.entries = True, self.entries + 1
        try:
            yield
        finally:
            self.inside = False
            handle.remove()

    def _seen(self) -> None:
        assert self.inside
        self.calls_inside += 1

    def attach(self, model):
        return self._ctx(model)


class FullAttentionPolicy:
    """A TokenPolicyRuntime that keeps every token: greedy decode on a DynamicCache seeded with the prefix."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[tuple[int, ...]] | None]] = []

    @torch.inference_mode()
    def stream(self, model, input_ids, *, prefix_kv, num_prefix_tokens, context_tokens):
        self.seen.append((num_prefix_tokens, None if prefix_kv is None else [tuple(k.shape) for k, _ in prefix_kv]))
        cache = DynamicCache(config=model.config)
        if prefix_kv is not None:
            for layer, (k, v) in zip(cache.layers, prefix_kv):
                layer.update(k, v)
        logits = model(input_ids=torch.tensor([input_ids[num_prefix_tokens:]]), past_key_values=cache, use_cache=True).logits[0, -1]
        while True:
            t = int(logits.argmax())
            yield t
            logits = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1]


def test_attention_hook_wraps_every_forward_call(model, store):
    hook = RecordingAttention()
    assert isinstance(hook, AttentionHook)
    ids = prompt(50, seed=12)
    r = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=5, stop_tokens=(), attention=hook)
    assert hook.entries == 1 and hook.calls_inside == 5 and not hook.inside
    assert r.token_ids == generate(model, ids, max_new_tokens=5, stop_tokens=()).token_ids


def test_policy_gets_the_cached_prefix_and_the_blocks_get_saved(model, store):
    policy = FullAttentionPolicy()
    assert isinstance(policy, TokenPolicyRuntime)
    ids = prompt(75, seed=13)
    base = generate(model, ids, max_new_tokens=6, stop_tokens=())
    r1 = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=6, policy=policy)
    r2 = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=6, policy=policy)
    # cold: generate prefilled and saved the 4 full blocks before handing over; warm: loaded them
    assert policy.seen == [(64, [(1, 2, 64, 16)] * 2)] * 2
    assert r1.num_cached_tokens == 0 and r2.num_cached_tokens == 64 and 0 < r1.ttft_s <= r1.total_s
    assert r1.token_ids == r2.token_ids == base.token_ids
    assert store.stats()["blocks"] == 4
    # without kvtier the policy gets no prefix
    assert generate(model, ids, max_new_tokens=2, policy=policy).token_ids == base.token_ids[:2]
    assert policy.seen[-1] == (0, None)


# -- stopping, text, sampling ----------------------------------------------------------------------
def test_stop_tokens_and_sampling(model, store):
    ids = prompt(30, seed=14)
    greedy = generate(model, ids, max_new_tokens=8, stop_tokens=())
    r = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=8, stop_tokens=[greedy.token_ids[2]])
    assert r.token_ids == greedy.token_ids[: greedy.token_ids.index(greedy.token_ids[2]) + 1] and r.finish_reason == "stop"
    a = generate(model, ids, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(1), stop_tokens=())
    b = generate(model, ids, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(1), stop_tokens=())
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input_raises_value_error_and_stores_nothing(model, store):
    ids = prompt(40)
    wrong = KVSpec("tiny-llama-test", num_layers=3, num_kv_heads=2, head_dim=16, dtype="float32", block_tokens=BT)
    with pytest.raises(ValueError, match="num_layers, num_kv_heads, head_dim"):
        KVTierCache(model, kv=store, spec=wrong)
    with pytest.raises(ValueError, match=r"give kv= \(a TieredStore, a KVTierClient or a KVBackend\) once, got none"):
        KVTierCache(model, spec=SPEC32)
    with pytest.raises(ValueError, match=r"once, got \['kv', 'client'\]"):
        generate(model, ids, kv=store, client=object(), spec=SPEC32)
    with pytest.raises(ValueError, match="TieredStore"):
        KVTierCache(model, kv={}, spec=SPEC32)
    with pytest.raises(ValueError, match="KVTierClient"):
        KVTierCache(model, kv="http://x", spec=SPEC32)
    with pytest.raises(ValueError, match="tenant="):
        KVTierCache(model, kv=KVTierClient("http://127.0.0.1:9"), spec=SPEC32, tenant="t")
    with pytest.raises(ValueError, match="spec must be"):
        KVTierCache(model, kv=store, spec={"model_id": "x"})
    with pytest.raises(ValueError, match="name_or_path"):
        model_spec(model)
    assert model_spec(model, model_id="tiny-llama-test", block_tokens=BT, dtype="float32") == SPEC32
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, "a text", kv=store, spec=SPEC32)
    for bad in ([], [1, 2.5], [1, -1], [True], torch.zeros(2, 3, dtype=torch.long), "", torch.tensor([1.0])):
        with pytest.raises(ValueError):
            generate(model, bad, kv=store, spec=SPEC32, tokenizer=None)
    for kw in (dict(max_new_tokens=0), dict(chunk_tokens=0), dict(attention=object()), dict(policy=object())):
        with pytest.raises(ValueError):
            generate(model, ids, kv=store, spec=SPEC32, **kw)
    cache = KVTierCache(model, kv=store, spec=SPEC32)
    with pytest.raises(ValueError, match="load_prefix"):
        cache.save()
    with pytest.raises(ValueError, match="load_prefix"):
        cache.append_tokens([1])
    with pytest.raises(ValueError, match="empty"):
        cache.load_prefix([])
    cache.load_prefix(ids)
    with pytest.raises(ValueError, match="already holds"):
        cache.load_prefix(ids)
    with torch.inference_mode():  # feeding tokens the cache was not told about
        model(input_ids=torch.tensor([ids + [1, 2]]), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="append_tokens"):
        cache.save()
    assert store.stats()["blocks"] == 0


def test_sliding_window_models_are_refused(store):
    torch.manual_seed(0)
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=32,
    )
    m = MistralForCausalLM(cfg).eval()
    spec = KVSpec("mistral-tiny", 1, 1, 16, "float32", 16)
    with pytest.raises(ValueError, match="sliding-window"):
        KVTierCache(m, kv=store, spec=spec)


def test_store_backend_checks_and_stats_dict(store):
    with pytest.raises(ValueError, match="KVSpec"):
        StoreBackend(store, "spec")
    assert CacheStats().to_dict()["tier_hits"] == {}


# -- generate() with the real runtimes of hf_attention / hf_tokens -------------------------------------
def test_generate_with_sparse_decode_covering_the_context_equals_plain(model, store):
    from kvtier.connectors.hf_attention import SparseDecode

    ids = prompt(80, seed=11)
    base = generate(model, ids, max_new_tokens=12, stop_tokens=())
    sparse = SparseDecode("quest", budget=4096)  # every token: the same attention
    assert isinstance(sparse, AttentionHook)
    cold = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=12, stop_tokens=(), attention=sparse)
    warm = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=12, stop_tokens=(), attention=sparse)
    assert warm.num_cached_tokens == 64 and sparse.stats.decode_calls > 0
    assert cold.token_ids == warm.token_ids == base.token_ids
    small = SparseDecode("quest", budget=32, num_sink=0, num_recent=16, dense_below=0)  # a third of the context: really sparse
    r = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=12, stop_tokens=(), attention=small)
    assert r.num_cached_tokens == 64 and len(r.token_ids) == 12
    assert small.stats.sparse_calls > 0 and small.stats.selected_tokens < small.stats.context_tokens
    auto = SparseDecode("quest", budget=32, num_sink=0, num_recent=16)  # 80 tokens: far below the crossover, dense
    r = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=12, stop_tokens=(), attention=auto)
    assert r.token_ids == base.token_ids and auto.stats.sparse_calls == 0 and auto.stats.dense_calls == auto.stats.decode_calls > 0


def test_generate_with_a_real_token_policy_uses_the_cached_prefix(model, store):
    from kvtier.connectors.hf_tokens import TokenPolicy

    ids = prompt(90, seed=12)
    base = generate(model, ids, max_new_tokens=10, stop_tokens=())
    for mode in ("drop", "demote"):
        policy = TokenPolicy("snapkv", ratio=0.0, mode=mode, chunk_tokens=32)  # nothing evicted: plain greedy
        assert isinstance(policy, TokenPolicyRuntime)
        r = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=10, stop_tokens=(), policy=policy)
        assert r.token_ids == base.token_ids
    assert r.num_cached_tokens == 80  # the first call saved the prompt's full blocks, the second loaded them
    squeezed = TokenPolicy("snapkv", ratio=0.5, mode="demote", chunk_tokens=32)
    r = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=10, stop_tokens=(), policy=squeezed)
    assert len(r.token_ids) == 10 and squeezed.last_kv.stats.demoted_tokens > 0


def test_generate_shared_prefix_loads_the_prefix_from_kvtier_and_matches_each_sequence_alone(model, store):
    from kvtier.connectors.generate import generate_shared_prefix

    prefix = prompt(70, seed=13)
    suffixes = [prompt(5, seed=20 + b) for b in range(3)]
    alone = [generate(model, prefix + s, max_new_tokens=6, stop_tokens=()).token_ids for s in suffixes]
    cold = generate_shared_prefix(model, prefix, suffixes, kv=store, spec=SPEC32, max_new_tokens=6)
    warm = generate_shared_prefix(model, prefix, suffixes, kv=store, spec=SPEC32, max_new_tokens=6)
    assert cold.num_cached_tokens == 0 and warm.num_cached_tokens == 64 and warm.cache.num_loaded_blocks == 4
    assert cold.token_ids == warm.token_ids == alone
    base = generate_shared_prefix(model, prefix, suffixes, max_new_tokens=6, attention="per_sequence")  # no kvtier
    assert base.token_ids == alone and base.cache is None
    with pytest.raises(ValueError):
        generate_shared_prefix(model, prefix, [], kv=store, spec=SPEC32)


# -- generate() under a token policy: stop tokens, timings, context-only compression, cache hits -------
def _fast_positions(kv) -> list[list[list[int]]]:
    return [[kv.fast_positions(layer, h).tolist() for h in range(kv.num_kv_heads)] for layer in range(kv.num_layers)]


def test_policy_stops_at_a_stop_token_and_times_the_first_token(model, store):
    from kvtier.connectors.hf_tokens import TokenPolicy

    ids = prompt(60, seed=21)
    base = generate(model, ids, max_new_tokens=8, stop_tokens=()).token_ids
    stop = base[3]
    for kw in ({}, dict(kv=store, spec=SPEC32), dict(context_tokens=50)):
        policy = TokenPolicy("snapkv", ratio=0.0, chunk_tokens=32)  # nothing evicted: plain greedy
        r = generate(model, ids, max_new_tokens=8, stop_tokens=[stop], policy=policy, **kw)
        assert r.token_ids == base[: base.index(stop) + 1] and r.finish_reason == "stop"
        assert 0 < r.ttft_s < r.total_s and r.decode_s < r.total_s
        assert abs(r.ttft_s + r.decode_s - r.total_s) < 0.05  # decode_s starts at the first token
        assert r.decode_tokens_per_s == pytest.approx((len(r.token_ids) - 1) / r.decode_s)
        r = generate(model, ids, max_new_tokens=8, stop_tokens=(), policy=policy, **kw)
        assert r.token_ids == base and r.finish_reason == "length"


def test_context_tokens_compresses_the_context_once_and_keeps_the_question(model):
    """generate(policy, context_tokens=N) = kvpress's pipeline: the context's KV and its last
    ``window`` queries, one compression, then the question and the answer on top, never evicted."""
    from kvtier.eviction.tokens import Compressor
    from kvtier.connectors.hf_tokens import TokenPolicy, greedy_evicting, make_evicting_kv

    ids = prompt(100, seed=22)
    N, budget, window = 80, 24, 8
    policy = TokenPolicy("snapkv", budget=budget, window=window, sink_tokens=2, window_tokens=4, chunk_tokens=32)
    r = generate(model, ids, max_new_tokens=6, stop_tokens=(), policy=policy, context_tokens=N)
    kv = policy.last_kv
    assert kv.stats.compressions == 2  # once per layer
    for layer in range(2):
        for h in range(2):
            pos = kv.fast_positions(layer, h)
            assert int((pos < N).sum()) == budget  # the context, compressed
            assert pos[pos >= N].tolist() == list(range(N, len(ids) + 5))  # the question and the answer, all kept
    # the same compression by hand: the context's KV and window queries, one compress(), then the rest
    ref_kv = make_evicting_kv(model, Compressor("snapkv", budget=budget, sink_tokens=2, window_tokens=4), observation_window=window)
    assert greedy_evicting(model, ref_kv, ids[:N], 0, 0) == []
    ref_kv.compress()
    assert greedy_evicting(model, ref_kv, ids[N:], N, 6) == r.token_ids
    assert _fast_positions(ref_kv)[0][0][:budget] == _fast_positions(kv)[0][0][:budget]


def test_compression_is_the_same_with_and_without_a_cache_hit(model, store):
    """A cached prefix (its KV, no queries) compresses exactly as the same prefix prefilled in the
    request: the window queries a cache lacks are recomputed from it."""
    from kvtier.connectors.hf_tokens import TokenPolicy

    ids = prompt(100, seed=23)
    for context_tokens in (70, None):  # the context ends 6 tokens after the last full block (64): 2 queries recomputed
        runs, own = [], TieredStore([HostTier(1 << 24)])
        for save in (False, True, True):  # miss without saving, miss that saves, hit
            policy = TokenPolicy("snapkv", budget=20, window=8, sink_tokens=2, window_tokens=4, chunk_tokens=32, compress_every=4)
            r = generate(
                model,
                ids,
                kv=own,
                spec=SPEC32,
                max_new_tokens=6,
                stop_tokens=(),
                policy=policy,
                context_tokens=context_tokens,
                save=save,
            )
            runs.append((r.num_cached_tokens, r.token_ids, _fast_positions(policy.last_kv)))
        own.close()
        assert [n for n, _, _ in runs] == [0, 0, 64 if context_tokens else 96]
        assert runs[0][1:] == runs[1][1:] == runs[2][1:]
    # without kvtier the context is prefilled inside the policy: the same tokens kept and the same answer
    policy = TokenPolicy("snapkv", budget=20, window=8, sink_tokens=2, window_tokens=4, chunk_tokens=32)
    r = generate(model, ids, max_new_tokens=6, stop_tokens=(), policy=policy, context_tokens=70)
    policy2 = TokenPolicy("snapkv", budget=20, window=8, sink_tokens=2, window_tokens=4, chunk_tokens=32)
    for _ in range(2):  # the second call hits
        r2 = generate(model, ids, kv=store, spec=SPEC32, max_new_tokens=6, stop_tokens=(), policy=policy2, context_tokens=70)
    assert r2.num_cached_tokens == 64 and r.token_ids == r2.token_ids
    assert _fast_positions(policy.last_kv) == _fast_positions(policy2.last_kv)


def test_prefix_queries_are_the_queries_of_a_full_prefill(model):
    from kvtier.connectors.hf_tokens import EVICTING_ATTENTION, prefix_queries  # noqa: F401
    from kvtier.connectors.hf_dispatch import bind, sdpa

    ids = prompt(40, seed=24)
    seen = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = query[0].clone()
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), bind(model, "kvtier_test_capture", capture, sdpa_mask=True):
        model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    kv = [(lay.keys, lay.values) for lay in cache.layers]
    q = prefix_queries(model, kv, ids, 30, 40)
    for layer in range(2):
        torch.testing.assert_close(q[layer], seen[layer][:, 30:40], rtol=1e-5, atol=1e-5)


def test_context_tokens_bad_values(model, store):
    from kvtier.connectors.hf_tokens import TokenPolicy

    ids = prompt(30, seed=25)
    for bad in (0, 31, -1, 2.0, True):
        with pytest.raises(ValueError, match="context_tokens"):
            generate(model, ids, kv=store, spec=SPEC32, policy=TokenPolicy(ratio=0.5), context_tokens=bad)
        with pytest.raises(ValueError, match="context_tokens"):
            TokenPolicy(ratio=0.5).stream(model, ids, context_tokens=bad)
    assert store.stats()["blocks"] == 0
    # without a policy context_tokens changes nothing
    assert (
        generate(model, ids, max_new_tokens=3, stop_tokens=(), context_tokens=20).token_ids
        == generate(model, ids, max_new_tokens=3, stop_tokens=()).token_ids
    )


def test_kv_is_the_one_way_to_pass_the_blocks_the_older_names_warn(model, store):
    """``kv=`` takes a store, a client or a backend; ``store=``/``client=``/``backend=`` still work, with a warning."""
    ids = prompt(40)
    backend = StoreBackend(store, SPEC32)
    cache = KVTierCache(model, kv=backend)  # the spec comes from the backend
    assert cache.backend is backend and cache.spec == SPEC32
    with pytest.warns(DeprecationWarning, match="store= is deprecated: pass kv="):
        old = generate(model, ids, store=store, spec=SPEC32, max_new_tokens=4, stop_tokens=())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = generate(model, ids, kv=backend, max_new_tokens=4, stop_tokens=())
    assert new.token_ids == old.token_ids and new.num_cached_tokens > 0
