"""kvtier's attention inside transformers models: SparseDecode, TokenPolicy, shared_prefix_generate.

Tiny randomly initialised Llama models (2 layers, hidden 64, 4 query heads, 2 KV heads, head dim 16)
built here, float32; one slow test on the reference model.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the connectors need transformers (make setup installs it)")
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

from kvtier.retrieval import get_selector  # noqa: E402
from kvtier.connectors.hf_attention import SparseDecode, TokenPolicy, shared_prefix_generate  # noqa: E402
from kvtier.connectors.hf_shared_prefix import SharedPrefixStats, prefix_kv_of  # noqa: E402

VOCAB = 128


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.1,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompt(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


@torch.inference_mode()
def greedy(model, ids, n: int, hook=None, cache=None):
    """Plain greedy decoding with a transformers cache; returns (tokens [B][n], logits [n, B, V])."""
    ids = torch.as_tensor(ids)
    ids = ids.view(1, -1) if ids.dim() == 1 else ids  # [B, T]
    cache = DynamicCache(config=model.config) if cache is None else cache
    toks, logits = [], []
    with hook.attach(model) if hook is not None else contextlib.nullcontext():
        pos = ids.shape[1]
        lg = model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(pos)).logits[:, -1]
        for i in range(n):
            t = lg.argmax(-1)
            toks.append(t)
            logits.append(lg)
            if i + 1 < n:
                lg = model(input_ids=t.view(-1, 1), past_key_values=cache, use_cache=True, cache_position=torch.tensor([pos])).logits[:, -1]
                pos += 1
    return torch.stack(toks, 1).tolist(), torch.stack(logits)


# -- SparseDecode -------------------------------------------------------------------------------------
def test_sparse_decode_with_budget_covering_the_context_equals_full_attention(model):
    ids = prompt(200)
    ref_toks, ref_logits = greedy(model, ids, 12)
    hook = SparseDecode(selector="quest", budget=256)
    toks, logits = greedy(model, ids, 12, hook)
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert hook.stats.decode_calls == 11 * 2 and hook.stats.sparse_calls == 0
    assert model.config._attn_implementation == "sdpa"  # restored on exit


def test_sparse_decode_inside_model_generate(model):
    ids = torch.tensor([prompt(200, seed=13), prompt(200, seed=14)])
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=None)
    ref = model.generate(ids, **kwargs)
    hook = SparseDecode(budget=256)
    with hook.attach(model):
        assert torch.equal(model.generate(ids, **kwargs), ref)
    sparse = SparseDecode(budget=64, dense_below=0)
    with sparse.attach(model):
        model.generate(ids, **kwargs)
    assert sparse.stats.sparse_calls == 7 * 2 and sparse.stats.state_builds == 2  # one request, two layers


@pytest.mark.parametrize("selector", ["quest", "topk_exact"])
def test_sparse_decode_output_is_full_attention_over_the_selected_tokens(model, selector):
    B, H_q, H_kv, T, D, budget = 2, 4, 2, 150, 16, 48
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H_q, 1, D, generator=g)
    k = torch.randn(B, H_kv, T, D, generator=g)
    v = torch.randn(B, H_kv, T, D, generator=g)
    module = model.model.layers[1].self_attn
    hook = SparseDecode(selector=selector, budget=budget, dense_below=0, record=True)
    with hook.attach(model):
        out, _ = AttentionInterface()["kvtier_sparse"](module, q, k, v, None, scaling=module.scaling)
    ids = hook.last_indices[1]  # [B, H_kv, budget]
    assert ids.shape == (B, H_kv, budget)
    # the selection is the selector's own (no state: same as a fresh select)
    decode_opts = {"page_tokens": 8} if selector == "quest" else {}  # DECODE_SELECTOR_DEFAULTS
    assert torch.equal(ids, get_selector(selector, **decode_opts).select(q[:, :, 0], k, budget))
    for b in range(B):
        for h in range(H_kv):
            sel = ids[b, h][ids[b, h] >= 0]
            assert sel.numel() <= budget
            assert set(range(4)) <= set(sel.tolist()) and set(range(T - 32, T)) <= set(sel.tolist())  # sinks + recent
            for g_ in range(H_q // H_kv):
                hq = h * (H_q // H_kv) + g_
                s = (q[b, hq, 0].double() @ k[b, h, sel].double().T) / math.sqrt(D)
                ref = torch.softmax(s, -1) @ v[b, h, sel].double()
                torch.testing.assert_close(out[b, 0, hq].double(), ref, atol=2e-5, rtol=2e-5)
    assert out.shape == (B, 1, H_q, D)


def test_incremental_selector_state_equals_recomputation(model):
    ids = prompt(300, seed=2)
    hook = SparseDecode(selector="quest", budget=64, dense_below=0, record=True)
    cache = DynamicCache(config=model.config)
    toks, logits = greedy(model, ids, 40, hook, cache)  # 39 decode steps: crosses four page boundaries
    assert hook.stats.state_builds == 2 and hook.stats.sparse_calls == 39 * 2  # built once per layer, then extended
    quest = get_selector("quest", page_tokens=8)  # SparseDecode's Quest pages (DECODE_SELECTOR_DEFAULTS)
    for layer in range(2):
        st = hook.layer_state(cache, layer)
        T = cache.layers[layer].keys.shape[2]
        assert st.num_tokens == (T - 1) // 8 * 8  # the full pages as of the last step
        fresh = quest.prepare(cache.layers[layer].keys[:, :, : st.num_tokens])
        assert torch.equal(st.kmin, fresh.kmin) and torch.equal(st.kmax, fresh.kmax)
    # and the decoded tokens are those of a run that rebuilds every state at every step
    rebuilt = SparseDecode(selector="quest", budget=64, dense_below=0)
    cache2 = DynamicCache(config=model.config)
    out = []
    with torch.inference_mode():
        lg = None
        for i in range(40):
            rebuilt.reset()
            with rebuilt.attach(model):
                x = torch.tensor([ids]) if i == 0 else torch.tensor([[out[-1]]])
                lg = model(input_ids=x, past_key_values=cache2, use_cache=True).logits[0, -1]
            out.append(int(lg.argmax()))
    assert out == toks[0]
    assert rebuilt.stats.state_builds == 39 * 2


def test_a_new_cache_is_a_new_request_and_a_cropped_cache_rebuilds(model):
    hook = SparseDecode(selector="quest", budget=64, dense_below=0)
    a, _ = greedy(model, prompt(200, seed=3), 6, hook)
    b, _ = greedy(model, prompt(220, seed=4), 6, hook)
    assert hook.stats.state_builds == 4  # two requests x two layers
    assert b == greedy(model, prompt(220, seed=4), 6, SparseDecode(selector="quest", budget=64, dense_below=0))[0]
    # a cache cropped under the hook (speculative decoding does that): the state is rebuilt, not reused
    cache = DynamicCache(config=model.config)
    greedy(model, prompt(200, seed=3), 6, hook, cache)
    builds = hook.stats.state_builds
    cache.crop(150)
    with hook.attach(model), torch.inference_mode():
        model(input_ids=torch.tensor([prompt(80, seed=9)]), past_key_values=cache, use_cache=True)
        model(input_ids=torch.tensor([[1]]), past_key_values=cache, use_cache=True)
    assert hook.stats.state_builds == builds + 2
    st = hook.layer_state(cache, 0)
    fresh = get_selector("quest", page_tokens=8).prepare(cache.layers[0].keys[:, :, : st.num_tokens])
    assert torch.equal(st.kmax, fresh.kmax)


def test_sparse_decode_batch_equals_each_sequence_alone(model):
    x, y = prompt(180, seed=6), prompt(180, seed=7)
    both, _ = greedy(model, torch.tensor([x, y]), 8, SparseDecode(budget=64, dense_below=0))
    assert both[0] == greedy(model, x, 8, SparseDecode(budget=64, dense_below=0))[0][0]
    assert both[1] == greedy(model, y, 8, SparseDecode(budget=64, dense_below=0))[0][0]


def test_sparse_decode_works_with_a_static_cache(model):
    ids = prompt(200, seed=8)
    dyn, _ = greedy(model, ids, 8, SparseDecode(budget=64, dense_below=0))
    static = StaticCache(config=model.config, max_cache_len=512)
    st, _ = greedy(model, ids, 8, SparseDecode(budget=64, dense_below=0), static)
    assert st == dyn


def test_short_contexts_decode_densely_and_equal_full_attention(model):
    ids = prompt(200, seed=6)
    ref, _ = greedy(model, ids, 6)
    hook = SparseDecode(selector="quest", budget=64)  # dense_below="auto": 200 tokens are far below the crossover
    assert hook.crossover_tokens() > 200 and SparseDecode(budget=1024).crossover_tokens() == 2 * hook.crossover_tokens()
    assert SparseDecode(budget=64, dense_below=150).crossover_tokens() == 150
    out, _ = greedy(model, ids, 6, hook)
    assert out == ref and hook.stats.sparse_calls == 0 and hook.stats.dense_calls == hook.stats.decode_calls == 5 * 2
    hook = SparseDecode(selector="quest", budget=64, dense_below=203)  # sparse from the step whose context reaches 203
    greedy(model, ids, 6, hook)
    assert hook.stats.dense_calls == 2 * 2 and hook.stats.sparse_calls == 3 * 2


class _GatedSelector(type(get_selector("ann"))):
    """ANN whose prepare() waits for a gate: a slow index build, on demand."""

    def __init__(self, gate, **kw) -> None:
        super().__init__(**kw)
        self.gate = gate

    def prepare(self, k):
        assert self.gate.wait(30)
        return super().prepare(k)


def test_index_states_build_in_the_background_and_decode_waits_for_none(model):
    import threading

    gate = threading.Event()
    sel = _GatedSelector(gate, num_sink=4, num_recent=16, backend="exact")
    assert sel.state_is_index
    hook = SparseDecode(selector=sel, budget=64, dense_below=0)  # build="auto": an index is built in the background
    ids = prompt(200, seed=7)
    ref, _ = greedy(model, ids, 4)
    cache = DynamicCache(config=model.config)
    with hook.attach(model), torch.inference_mode():
        lg = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[:, -1]
        toks = []
        for _ in range(3):  # the index is not ready: full attention, the same tokens as without the hook
            toks.append(int(lg.argmax()))
            lg = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache, use_cache=True).logits[:, -1]
        assert toks == ref[0][:3]
        assert hook.stats.sparse_calls == 0 and hook.stats.dense_calls == 6 and hook.stats.background_builds == 2
        gate.set()
        hook.wait_for_states(30)
        for _ in range(3):  # ready: sparse, the index extended with the tokens decoded meanwhile
            toks.append(int(lg.argmax()))
            lg = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache, use_cache=True).logits[:, -1]
    assert hook.stats.sparse_calls == 6 and hook.stats.state_builds == 2
    assert hook.layer_state(cache, 0).num_tokens == 206  # built over 200 tokens, extended to the 6th decoded one
    inline = SparseDecode(
        selector=get_selector("ann", num_sink=4, num_recent=16, backend="exact"), budget=64, dense_below=0, build="inline"
    )
    greedy(model, ids, 4, inline)
    assert inline.stats.sparse_calls == 3 * 2 and inline.stats.background_builds == 0


def test_sparse_decode_rejects_a_padded_batch(model):
    hook = SparseDecode(budget=64, dense_below=0)
    ids = torch.tensor([prompt(100, seed=1), prompt(100, seed=2)])
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, :10] = 0  # left padding
    cache = DynamicCache(config=model.config)
    with hook.attach(model), torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)  # prefill: SDPA handles padding
        with pytest.raises(ValueError, match="equal-length"):
            model(
                input_ids=torch.tensor([[1], [2]]),
                attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                past_key_values=cache,
                use_cache=True,
            )
    assert model.config._attn_implementation == "sdpa"


def test_sparse_decode_bad_arguments(model):
    with pytest.raises(ValueError, match="budget"):
        SparseDecode(budget=0)
    with pytest.raises(ValueError, match="num_sink \\+ num_recent"):
        SparseDecode(budget=20)  # sinks 4 + recent 32
    with pytest.raises(ValueError, match="unknown selector"):
        SparseDecode(selector="nope")
    with pytest.raises(ValueError, match="selector name"):
        SparseDecode(selector=get_selector("quest"), num_sink=2)
    with pytest.raises(ValueError, match="dense_layers"):
        SparseDecode(dense_layers=-1)
    for bad in (-1, 1.5, "never", True):
        with pytest.raises(ValueError, match="dense_below"):
            SparseDecode(dense_below=bad)
    with pytest.raises(ValueError, match="build"):
        SparseDecode(build="later")
    with pytest.raises(ValueError, match="causal LM"):
        SparseDecode().attach(torch.nn.Linear(2, 2))
    hook = SparseDecode()
    with hook.attach(model):
        with pytest.raises(ValueError, match="already"):
            with SparseDecode().attach(model):
                pass
        assert model.config._attn_implementation == "kvtier_sparse"
    assert model.config._attn_implementation == "sdpa"


# -- TokenPolicy ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["drop", "demote"])
def test_token_policy_at_ratio_zero_is_plain_generation(model, mode):
    ids = prompt(300, seed=10)
    ref = greedy(model, ids, 12)[0][0]
    policy = TokenPolicy(scorer="snapkv", ratio=0.0, mode=mode, chunk_tokens=128, compress_every=4)
    assert policy.generate(model, ids, max_new_tokens=12) == ref
    assert policy.last_kv.stats.evicted_tokens == 0


def test_token_policy_demote_recalls_what_drop_loses(model):
    ids = prompt(400, seed=11)
    ref = greedy(model, ids, 10)[0][0]
    # drop: half the sequence leaves the fast tier, for good
    drop = TokenPolicy(scorer="snapkv", ratio=0.5, mode="drop", chunk_tokens=128, compress_every=8)
    drop.generate(model, ids, max_new_tokens=10)
    kv = drop.last_kv
    assert kv.stats.evicted_tokens > 0 and kv.stats.demoted_tokens == 0
    assert max(kv.fast_tokens(0)) <= (409 - 409 // 2) + 8  # budget of the tokens seen, plus the decode slack
    # demote with a recall budget covering every demoted token: exactly plain generation
    full = TokenPolicy(scorer="snapkv", ratio=0.5, mode="demote", recall_budget=4096, chunk_tokens=128, compress_every=8)
    assert full.generate(model, ids, max_new_tokens=10) == ref
    kv = full.last_kv
    assert kv.stats.demoted_tokens == kv.stats.evicted_tokens > 0
    for layer in range(2):
        for h in range(2):
            assert kv.fast_tokens(layer)[h] + kv.demoted_tokens(layer)[h] == 409  # nothing lost
    # demote with a small recall budget: each query reads at most that many demoted tokens per head
    small = TokenPolicy(scorer="snapkv", ratio=0.5, mode="demote", recall_budget=16, chunk_tokens=128, compress_every=8)
    small.generate(model, ids, max_new_tokens=10)
    queries = 400 - 128 + 9  # queries after the first compression (after the first chunk): the other chunks, 9 decode steps
    assert 0 < small.last_kv.stats.recalled_tokens <= queries * 2 * 2 * 16


def test_token_policy_uses_the_prefix_kv_without_recomputing_it(model):
    ids = prompt(300, seed=12)
    prefix = prefix_kv_of(model, ids[:200])
    fed = []
    handle = model.register_forward_pre_hook(lambda m, args, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        with_prefix = TokenPolicy(ratio=0.0).generate(model, ids, max_new_tokens=6, prefix_kv=prefix, num_prefix_tokens=200)
    finally:
        handle.remove()
    assert sum(fed) == 100 + 5  # the suffix, then one token per decode step
    assert with_prefix == greedy(model, ids, 6)[0][0]
    # a prefix covering the whole prompt: its last token is recomputed for the logits
    fed.clear()
    whole = prefix_kv_of(model, ids)
    assert TokenPolicy(ratio=0.0).generate(model, ids, max_new_tokens=6, prefix_kv=whole, num_prefix_tokens=300) == with_prefix


def test_token_policy_bad_arguments(model):
    for kwargs, match in [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": 0.5, "budget": 10}, "one of"),
        ({"mode": "keep"}, "mode"),
        ({"scorer": "nope"}, "scorer"),
        ({"budget": 0}, "budget"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
    ]:
        with pytest.raises(ValueError, match=match):
            TokenPolicy(**kwargs)
    policy = TokenPolicy(ratio=0.5)
    ids = prompt(50)
    with pytest.raises(ValueError, match="prefix_kv"):
        policy.generate(model, ids, max_new_tokens=2, prefix_kv=None, num_prefix_tokens=10)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        policy.generate(model, ids, max_new_tokens=2, prefix_kv=None, num_prefix_tokens=51)
    bad = [(torch.zeros(1, 2, 10, 8), torch.zeros(1, 2, 10, 8))] * 2  # head_dim 8, the model has 16
    with pytest.raises(ValueError, match="prefix_kv\\[0\\].k"):
        policy.generate(model, ids, max_new_tokens=2, prefix_kv=bad, num_prefix_tokens=10)
    with pytest.raises(ValueError, match="input_ids"):
        policy.generate(model, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        policy.generate(model, ids, max_new_tokens=-1)
    assert model.config._attn_implementation == "sdpa"


# -- shared_prefix_generate ---------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["shared", "per_sequence"])
def test_shared_prefix_generate_equals_greedy_of_each_sequence(model, attention):
    prefix = prompt(150, seed=20)
    suffixes = [prompt(n, seed=30 + n) for n in (1, 5, 12, 3)]
    stats = SharedPrefixStats()
    out = shared_prefix_generate(model, prefix, suffixes, max_new_tokens=10, attention=attention, stats=stats)
    assert out == [greedy(model, prefix + s, 10)[0][0] for s in suffixes]
    assert stats.decode_steps == 9 and stats.batch == 4 and stats.prefix_tokens == 150
    assert 0 < stats.decode_attention_seconds <= stats.decode_seconds
    # the prefix's KV handed over (as loaded from kvtier) gives the same
    assert (
        shared_prefix_generate(model, prefix, suffixes, max_new_tokens=10, prefix_kv=prefix_kv_of(model, prefix), attention=attention)
        == out
    )


def test_shared_prefix_generate_bad_arguments(model):
    p = prompt(20)
    for args, kwargs, match in [
        ((p, []), {}, "suffix_ids_list"),
        ((p, [[1], []]), {}, "suffix_ids_list\\[1\\]"),
        (([], [[1]]), {}, "prefix_ids"),
        ((p, [[1]]), {"max_new_tokens": -1}, "max_new_tokens"),
        ((p, [[1]]), {"attention": "dense"}, "attention"),
        ((p, [[1]]), {"prefix_kv": [(torch.zeros(1, 2, 5, 16),) * 2] * 2}, "prefix_kv\\[0\\]"),
        ((p, [["a"]]), {}, "suffix_ids_list\\[0\\]"),
    ]:
        kwargs.setdefault("max_new_tokens", 2)
        with pytest.raises(ValueError, match=match):
            shared_prefix_generate(model, *args, **kwargs)
    assert model.config._attn_implementation == "sdpa"


# -- the reference model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_sparse_decode_answers_the_pass_key_on_the_reference_model():
    from bench import refmodel

    torch.set_num_threads(2)
    ref, tok = refmodel.load_model()
    p = refmodel.passkey_prompt(tok, 2048, 0.5, seed=4)
    hook = SparseDecode(selector="quest", budget=512, dense_below=0)
    toks, _ = greedy(ref, list(p.input_ids), 8, hook)
    assert tok.decode(toks[0]).strip().startswith(p.key)
    assert hook.stats.sparse_calls == 7 * 30 and hook.stats.read_fraction < 0.3


# -- SparseDecode with the KV offloaded to the store -------------------------------------------------
def _paged_store(tmp_path, codec="paged"):
    from kvtier.kvstore import DiskTier, HostTier, TierConfig, TieredStore

    return TieredStore(
        [
            TierConfig(HostTier(1 << 20, codec=codec)),  # small: most blocks live on disk only
            TierConfig(DiskTier(tmp_path / "disk", 1 << 30, codec=codec)),
        ]
    )


def test_offloaded_decode_with_a_covering_budget_is_full_attention(model, tmp_path):
    ids = prompt(300, seed=11)
    ref, ref_logits = greedy(model, ids, 6)
    hook = SparseDecode(budget=4096, store=_paged_store(tmp_path))
    toks, logits = greedy(model, ids, 6, hook)
    assert toks == ref
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    assert hook.stats.offloaded_tokens == 192  # 3 blocks of 64; the last 108 prompt tokens (>= resident_tokens) stay
    st = hook.tier_attention.stats()
    assert st.page_misses == 2 * 2 * 12  # every page of both layers read once, then served from the page cache
    assert st.page_hits == 4 * 2 * 2 * 12  # 5 decode steps, the first one cold


def test_offloaded_decode_reads_selected_pages_from_the_tiers_only(model, tmp_path):
    ids = prompt(700, seed=12)
    store = _paged_store(tmp_path)
    hook = SparseDecode(budget=256, store=store, tier_options={"candidate_blocks": 4})
    cache = DynamicCache(config=model.config)
    toks, _ = greedy(model, ids, 70, hook, cache)  # crosses a block boundary: a second offload
    assert hook.stats.offloaded_tokens == 704  # 576 at the first decode step, more as generation goes (64 stay resident)
    assert float(cache.layers[0].keys[0, :, :704].abs().max()) == 0.0  # the stored prefix is not in the resident cache
    st = hook.tier_attention.stats()
    assert st.page_bytes_read and set(st.page_bytes_read) <= {"host", "disk"}
    assert st.selected_bytes < 0.5 * (70 * 2 * 700 * 2 * 2 * 16 * 4)  # far less than reading the context every step
    assert hook.stats.sparse_calls > 0 and hook.stats.read_fraction < 0.5
    with pytest.raises(ValueError, match="prefill"):
        with hook.attach(model):
            model(input_ids=torch.tensor([[1, 2]]), past_key_values=cache, use_cache=True, cache_position=torch.tensor([770, 771]))


def test_offloaded_decode_checks_its_options(tmp_path):
    store = _paged_store(tmp_path)
    with pytest.raises(ValueError):
        SparseDecode(store=object())
    with pytest.raises(ValueError):
        SparseDecode(store=store, dense_layers=-1)
    with pytest.raises(ValueError):
        SparseDecode(prefill_budget=512)  # streaming a prefill needs a store
    with pytest.raises(ValueError):
        SparseDecode(store=store, prefill_budget=8)
    with pytest.raises(ValueError):
        SparseDecode(store=store, selector="topk_exact")
    with pytest.raises(ValueError):
        SparseDecode(store=store, block_tokens=40)
    with pytest.raises(ValueError):
        SparseDecode(store=store, resident_tokens=-1)


def test_offloaded_dense_layers_read_every_page_from_the_tiers(model, tmp_path):
    ids = prompt(700, seed=13)
    hook = SparseDecode(budget=256, store=_paged_store(tmp_path), dense_layers=1, tier_options={"prefetch": False})
    greedy(model, ids, 2, hook)
    st = hook.tier_attention.stats()
    # one decode step: 576 tokens stored (9 blocks), 125 resident; layer 0 attends every stored page (36 per KV head),
    # layer 1 its budget less the resident tail ((256 - 125) // 16 = 8 pages)
    assert st.pages_selected == 2 * 36 + 2 * 8 and st.page_misses == 88


@torch.inference_mode()
def streamed_prefill(model, ids, hook, chunk):
    """Prefill ``ids`` ``chunk`` tokens at a time with ``hook`` attached; the last logits and the cache."""
    cache = DynamicCache(config=model.config)
    ids = torch.as_tensor(ids).view(1, -1)
    with hook.attach(model):
        for a in range(0, ids.shape[1], chunk):
            b = min(ids.shape[1], a + chunk)
            lg = model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True, cache_position=torch.arange(a, b)).logits[:, -1]
    return lg, cache


def test_streamed_prefill_with_a_covering_budget_equals_full_prefill(model, tmp_path):
    ids = prompt(600, seed=14)
    _, ref_logits = greedy(model, ids, 1)
    hook = SparseDecode(budget=4096, prefill_budget=4096, store=_paged_store(tmp_path))
    lg, cache = streamed_prefill(model, ids, hook, 100)
    assert torch.allclose(lg, ref_logits[0], atol=1e-4)
    assert hook.stats.offloaded_tokens == 384  # blocks ending >= 64 tokens before the last chunk: 500 - 64 = 436 -> 6 blocks
    assert float(cache.layers[1].keys[0, :, :384].abs().max()) == 0.0  # released from the resident cache
    assert hook.tier_attention.stats().prefill_chunks == 6 * 2


def test_streamed_prefill_selects_pages_of_the_stored_context(model, tmp_path):
    ids = prompt(1200, seed=15)
    _, ref_logits = greedy(model, ids, 1)
    hook = SparseDecode(budget=256, prefill_budget=256, store=_paged_store(tmp_path))
    lg, _ = streamed_prefill(model, ids, hook, 128)
    st = hook.tier_attention.stats()
    assert st.page_misses and st.selected_bytes < 0.5 * (2 * 2 * 1024 * 2 * 16 * 4) * 8  # far less than the stored context per chunk
    assert torch.isfinite(lg).all() and float((lg - ref_logits[0]).abs().max()) < 1.0  # lossy, close (a random tiny model)


@pytest.mark.slow
def test_streamed_prefill_on_the_reference_model_agrees_with_full_prefill(tmp_path):
    """SmolLM2-135M, 1,024 held-out tokens prefilled 256 at a time with the KV streamed into the
    disk tier. With a covering budget the logits equal the in-memory full prefill's (atol 1e-3);
    with prefill_budget 256 (the last chunk attends 256 of the 704 stored tokens per KV head, plus
    its resident tokens) the next-token predictions agree with full prefill's at >= 80% of the
    positions and the prompt's perplexity is within +10% (the printed line gives the figures)."""
    from bench import refmodel

    torch.set_num_threads(2)
    ref, tok = refmodel.load_model()
    ids = torch.tensor(refmodel.heldout_ids(tok, 1024)).view(1, -1)

    def run(hook):
        cache = DynamicCache(config=ref.config)
        out = []
        with hook.attach(ref) if hook is not None else contextlib.nullcontext():
            for a in range(0, ids.shape[1], 256):
                b = a + 256
                out.append(ref(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True, cache_position=torch.arange(a, b)).logits[0])
        return torch.cat(out).float()  # [T, V]

    with torch.inference_mode():
        full = run(None)
        covering = run(SparseDecode(prefill_budget=4096, store=_paged_store(tmp_path / "a")))
        hook = SparseDecode(prefill_budget=256, store=_paged_store(tmp_path / "b"))
        sparse = run(hook)
    assert torch.allclose(covering, full, atol=1e-3)
    assert hook.stats.offloaded_tokens == 704 and hook.tier_attention.stats().page_misses > 0

    def ppl(lg):
        return float(torch.exp(torch.nn.functional.cross_entropy(lg[:-1], ids[0, 1:])))

    agree = float((sparse.argmax(-1) == full.argmax(-1)).float().mean())
    print(f"streamed prefill, budget 256: top-1 agreement {agree:.3f}, perplexity {ppl(sparse):.3f} vs {ppl(full):.3f}")
    assert agree >= 0.8 and ppl(sparse) <= 1.10 * ppl(full)
