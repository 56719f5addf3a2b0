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
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.1, attn_implementation="sdpa")
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
        lg = model(input_ids=ids, past_key_values=cache, use_cache=True,
                   cache_position=torch.arange(pos)).logits[:, -1]
        for i in range(n):
            t = lg.argmax(-1)
            toks.append(t)
            logits.append(lg)
            if i + 1 < n:
                lg = model(input_ids=t.view(-1, 1), past_key_values=cache, use_cache=True,
                           cache_position=torch.tensor([pos])).logits[:, -1]
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
    sparse = SparseDecode(budget=64)
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
    hook = SparseDecode(selector=selector, budget=budget, record=True)
    with hook.attach(model):
        out, _ = AttentionInterface()["kvtier_sparse"](module, q, k, v, None, scaling=module.scaling)
    ids = hook.last_indices[1]  # [B, H_kv, budget]
    assert ids.shape == (B, H_kv, budget)
    # the selection is the selector's own (no state: same as a fresh select)
    assert torch.equal(ids, get_selector(selector).select(q[:, :, 0], k, budget))
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
    hook = SparseDecode(selector="quest", budget=64, record=True)
    cache = DynamicCache(config=model.config)
    toks, logits = greedy(model, ids, 40, hook, cache)  # 39 decode steps: crosses two page boundaries
    assert hook.stats.state_builds == 2 and hook.stats.sparse_calls == 39 * 2  # built once per layer, then extended
    quest = get_selector("quest")
    for layer in range(2):
        st = hook.layer_state(cache, layer)
        T = cache.layers[layer].keys.shape[2]
        assert st.num_tokens == (T - 1) // 16 * 16  # the full pages as of the last step
        fresh = quest.prepare(cache.layers[layer].keys[:, :, : st.num_tokens])
        assert torch.equal(st.kmin, fresh.kmin) and torch.equal(st.kmax, fresh.kmax)
    # and the decoded tokens are those of a run that rebuilds every state at every step
    rebuilt = SparseDecode(selector="quest", budget=64)
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
    hook = SparseDecode(selector="quest", budget=64)
    a, _ = greedy(model, prompt(200, seed=3), 6, hook)
    b, _ = greedy(model, prompt(220, seed=4), 6, hook)
    assert hook.stats.state_builds == 4  # two requests x two layers
    assert b == greedy(model, prompt(220, seed=4), 6, SparseDecode(selector="quest", budget=64))[0]
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
    fresh = get_selector("quest").prepare(cache.layers[0].keys[:, :, : st.num_tokens])
    assert torch.equal(st.kmax, fresh.kmax)


def test_sparse_decode_batch_equals_each_sequence_alone(model):
    x, y = prompt(180, seed=6), prompt(180, seed=7)
    both, _ = greedy(model, torch.tensor([x, y]), 8, SparseDecode(budget=64))
    assert both[0] == greedy(model, x, 8, SparseDecode(budget=64))[0][0]
    assert both[1] == greedy(model, y, 8, SparseDecode(budget=64))[0][0]


def test_sparse_decode_works_with_a_static_cache(model):
    ids = prompt(200, seed=8)
    dyn, _ = greedy(model, ids, 8, SparseDecode(budget=64))
    static = StaticCache(config=model.config, max_cache_len=512)
    st, _ = greedy(model, ids, 8, SparseDecode(budget=64), static)
    assert st == dyn


def test_sparse_decode_rejects_a_padded_batch(model):
    hook = SparseDecode(budget=64)
    ids = torch.tensor([prompt(100, seed=1), prompt(100, seed=2)])
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, :10] = 0  # left padding
    cache = DynamicCache(config=model.config)
    with hook.attach(model), torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)  # prefill: SDPA handles padding
        with pytest.raises(ValueError, match="equal-length"):
            model(input_ids=torch.tensor([[1], [2]]), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                  past_key_values=cache, use_cache=True)
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
    for kwargs, match in [({"ratio": 1.0}, "ratio"), ({"ratio": 0.5, "budget": 10}, "one of"), ({"mode": "keep"}, "mode"),
                          ({"scorer": "nope"}, "scorer"), ({"budget": 0}, "budget"), ({"chunk_tokens": 0}, "chunk_tokens")]:
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
    assert shared_prefix_generate(model, prefix, suffixes, max_new_tokens=10, prefix_kv=prefix_kv_of(model, prefix),
                                  attention=attention) == out


def test_shared_prefix_generate_bad_arguments(model):
    p = prompt(20)
    for args, kwargs, match in [((p, []), {}, "suffix_ids_list"), ((p, [[1], []]), {}, "suffix_ids_list\\[1\\]"),
                                (([], [[1]]), {}, "prefix_ids"), ((p, [[1]]), {"max_new_tokens": -1}, "max_new_tokens"),
                                ((p, [[1]]), {"attention": "dense"}, "attention"),
                                ((p, [[1]]), {"prefix_kv": [(torch.zeros(1, 2, 5, 16),) * 2] * 2}, "prefix_kv\\[0\\]"),
                                ((p, [["a"]]), {}, "suffix_ids_list\\[0\\]")]:
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
    hook = SparseDecode(selector="quest", budget=512)
    toks, _ = greedy(ref, list(p.input_ids), 8, hook)
    assert tok.decode(toks[0]).strip().startswith(p.key)
    assert hook.stats.sparse_calls == 7 * 30 and hook.stats.read_fraction < 0.3
