"""Token scorers and the compressor: exact behaviour of each scorer, budgets, head profiles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvtier.eviction.tokens import (
    Compressor,
    HeadProfile,
    HeadProfiler,
    ScoreInputs,
    evicted_ids,
    gather_kv,
    get_scorer,
    mass_outside,
    window_attention,
)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dense_window_attention(q, k):
    """Plain reference: one query head at a time, explicit causal mask."""
    B, H_q, W, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    out = torch.zeros(B, H_q, W, T)
    for b in range(B):
        for h in range(H_q):
            kh = k[b, h // (H_q // H_kv)]
            for w in range(W):
                p = T - W + w
                logits = kh[: p + 1] @ q[b, h, w] / math.sqrt(D)
                out[b, h, w, : p + 1] = torch.softmax(logits, 0)
    return out


def test_window_attention_is_causal_softmax_with_gqa():
    q, k = rand(2, 6, 5, 8, seed=1), rand(2, 2, 30, 8, seed=2)
    torch.testing.assert_close(window_attention(q, k), dense_window_attention(q, k), atol=1e-6, rtol=1e-5)


def test_streaming_llm_keeps_sinks_and_the_most_recent():
    k = rand(1, 2, 50, 4)
    kept = Compressor("streaming_llm", budget=12, sink_tokens=4, window_tokens=2).keep(ScoreInputs(k, k))
    assert kept[0, 0].tolist() == [0, 1, 2, 3] + list(range(42, 50))
    assert torch.equal(kept[0, 0], kept[0, 1])


def test_snapkv_matches_the_paper_recipe():
    q, k, v = rand(1, 4, 6, 8, seed=3), rand(1, 2, 40, 8, seed=4), rand(1, 2, 40, 8, seed=5)
    got = get_scorer("snapkv", kernel_size=5).score(ScoreInputs(k, v, q))
    attn = dense_window_attention(q, k).mean(2)  # mean over the window's queries
    pooled = F.avg_pool1d(attn, 5, 1, 2, count_include_pad=False)
    torch.testing.assert_close(got, pooled.view(1, 2, 2, 40).mean(2), atol=1e-6, rtol=1e-5)


def test_tova_uses_the_last_query_only():
    q, k = rand(1, 2, 4, 8, seed=6), rand(1, 2, 20, 8, seed=7)
    q2 = q.clone()
    q2[:, :, :-1] = rand(1, 2, 3, 8, seed=8)  # earlier queries changed: same scores
    for heads in ("layer", "group"):
        s1 = get_scorer("tova", heads=heads).score(ScoreInputs(k, k, q))
        s2 = get_scorer("tova", heads=heads).score(ScoreInputs(k, k, q2))
        torch.testing.assert_close(s1, s2)
    last = dense_window_attention(q[:, :, -1:], k)[:, :, 0]  # [1, 2, 20], one query head per KV head
    torch.testing.assert_close(get_scorer("tova", heads="group").score(ScoreInputs(k, k, q)), last)
    layer = get_scorer("tova").score(ScoreInputs(k, k, q))  # the paper's: one average over all heads
    torch.testing.assert_close(layer, last.mean(1, keepdim=True).expand(1, 2, 20))
    with pytest.raises(ValueError, match="heads"):
        get_scorer("tova", heads="all")


def test_knorm_prefers_small_keys():
    k = torch.ones(1, 1, 10, 4)
    k[0, 0, 5] = 0.01
    k[0, 0, 7] = 10.0
    s = get_scorer("knorm").score(ScoreInputs(k, k))
    assert int(s[0, 0].argmax()) == 5 and int(s[0, 0].argmin()) == 7


def test_h2o_accumulates_chunk_by_chunk_like_all_queries_at_once():
    k, v, q = rand(1, 2, 48, 8, seed=9), rand(1, 2, 48, 8, seed=10), rand(1, 4, 48, 8, seed=11)
    once = get_scorer("h2o").score(ScoreInputs(k, v, q))  # every position's query at once
    h2o = get_scorer("h2o")
    for end in (16, 40, 48):  # three chunks: the cache grows, each call sees the new queries
        start = {16: 0, 40: 16, 48: 40}[end]
        chunked = h2o.score(ScoreInputs(k[:, :, :end], v[:, :, :end], q[:, :, start:end]))
    torch.testing.assert_close(chunked, once, atol=1e-5, rtol=1e-5)
    # after a compression the state follows the kept tokens
    kept = Compressor(h2o, budget=10, sink_tokens=1, window_tokens=2).keep(ScoreInputs(k, v, q[:, :, -1:]))
    acc = h2o._acc[0]
    assert acc.shape == kept.shape
    with pytest.raises(ValueError, match="reset"):
        h2o.score(ScoreInputs(k[:, :, :5], v[:, :, :5], q[:, :, :1]))
    h2o.reset()
    assert h2o.score(ScoreInputs(k[:, :, :5], v[:, :, :5], q[:, :, :1])).shape == (1, 2, 5)


def test_expected_attention_finds_the_key_the_queries_point_at():
    D = 16
    k = rand(1, 1, 64, D, seed=12) * 0.1
    target = torch.zeros(D)
    target[3] = 4.0
    k[0, 0, 20] = target
    q = (target + 0.05 * rand(8, D, seed=13)).view(1, 1, 8, D)
    s = get_scorer("expected_attention").score(ScoreInputs(k, torch.ones_like(k), q))
    assert int(s[0, 0].argmax()) == 20
    # value norms weigh the scores
    v = torch.ones_like(k)
    v[0, 0, 20] = 0.0
    s2 = get_scorer("expected_attention", epsilon=0.0).score(ScoreInputs(k, v, q))
    assert float(s2[0, 0, 20]) == 0.0


def test_pyramid_budgets_decrease_with_depth_and_keep_the_mean():
    p = get_scorer("pyramidkv", beta=4.0)
    budgets = [p.layer_budget(400, layer, 10) for layer in range(10)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert abs(sum(budgets) / 10 - 400) <= 1
    assert p.layer_budget(400, 0, 1) == 400


def test_adaptive_budgets_follow_the_scores_across_heads():
    # head 0's attention is concentrated, head 1's spread: AdaKV gives head 1 more tokens
    k = torch.zeros(1, 2, 100, 4)
    q = torch.zeros(1, 2, 1, 4)
    k[0, 0, 10:15, 0] = 8.0
    q[0, :, 0, 0] = 2.0
    k[0, 1] = rand(100, 4, seed=14) * 0.01
    per_head = get_scorer("tova", heads="group")  # scores that differ per KV head
    kept = Compressor(per_head, budget=20, sink_tokens=0, window_tokens=1, head_budgets="adaptive", floor=0.2).keep(ScoreInputs(k, k, q))
    counts = (kept >= 0).sum(-1)[0].tolist()
    assert sum(counts) == 40 and counts[1] > counts[0] >= 4
    assert set(range(10, 15)) <= set(kept[0, 0].tolist())


def test_head_profile_streaming_heads_keep_sinks_and_window_only():
    prof = HeadProfile(torch.tensor([[True, False, False]]))
    inputs = ScoreInputs(rand(1, 3, 60, 4), rand(1, 3, 60, 4), rand(1, 3, 2, 4))
    kept = Compressor("snapkv", budget=20, sink_tokens=2, window_tokens=6, head_profile=prof).keep(inputs)
    counts = (kept >= 0).sum(-1)[0].tolist()
    assert counts[1] == counts[2] == 8
    assert counts[0] == 3 * 20 - 2 * 8  # the retrieval head gets what the streaming heads freed
    assert kept[0, 1][:8].tolist() == [0, 1] + list(range(54, 60))
    with pytest.raises(ValueError, match="head_profile"):
        Compressor("snapkv", budget=20, head_profile=HeadProfile(torch.ones(2, 3, dtype=torch.bool))).keep(inputs)


def test_profiler_finds_the_retrieval_head():
    # KV head 0 attends far back (token 30: outside sinks and window), head 1 locally
    D, T, W = 8, 80, 4
    k = rand(1, 2, T, D, seed=15) * 0.01
    q = torch.zeros(1, 2, W, D)
    k[0, 0, 30, 0] = 10.0
    q[0, 0, :, 0] = 3.0
    k[0, 1, T - W - 1, 1] = 10.0  # visible to, and local for, every window query
    q[0, 1, :, 1] = 3.0
    m = mass_outside(q, k, sink_tokens=2, window_tokens=8)
    assert float(m[0, 0]) > 0.9 and float(m[0, 1]) < 0.1
    prof = HeadProfiler(num_layers=1, num_kv_heads=2, sink_tokens=2, window_tokens=8)
    prof.observe(0, q, k)
    profile = prof.profile(retrieval_fraction=0.5)
    assert profile.retrieval.tolist() == [[True, False]]
    assert HeadProfile.from_dict(profile.to_dict()).retrieval.tolist() == [[True, False]]
    with pytest.raises(ValueError, match="observe every layer"):
        HeadProfiler(2, 2).profile(0.5)


def test_gather_and_evicted_ids_split_the_cache():
    k, v = rand(1, 2, 30, 4, seed=16), rand(1, 2, 30, 4, seed=17)
    q = rand(1, 2, 3, 4, seed=18)
    kept = Compressor("snapkv", budget=10, sink_tokens=1, window_tokens=2, head_budgets="adaptive").keep(ScoreInputs(k, v, q))
    kk, vv, lengths = gather_kv(k, v, kept)
    ev = evicted_ids(kept, 30)
    for h in range(2):
        ids = kept[0, h][kept[0, h] >= 0]
        assert torch.equal(kk[0, h, : len(ids)], k[0, h, ids]) and torch.equal(vv[0, h, : len(ids)], v[0, h, ids])
        assert bool((kk[0, h, len(ids) :] == 0).all())
        assert sorted(ids.tolist() + ev[0, h][ev[0, h] >= 0].tolist()) == list(range(30))
    assert lengths.tolist() == [[int((kept[0, h] >= 0).sum()) for h in range(2)]]


def test_recompressing_a_compressed_cache_respects_lengths():
    k, v = rand(1, 2, 40, 4, seed=19), rand(1, 2, 40, 4, seed=20)
    q = rand(1, 2, 2, 4, seed=21)
    kept = Compressor("snapkv", budget=16, sink_tokens=2, window_tokens=3, head_budgets="adaptive").keep(ScoreInputs(k, v, q))
    kk, vv, lengths = gather_kv(k, v, kept)
    for name in ("knorm", "snapkv", "expected_attention", "h2o"):
        inputs = ScoreInputs(kk, vv, q[:, :, -1:], lengths=lengths)
        again = Compressor(name, budget=8, sink_tokens=2, window_tokens=3).keep(inputs)
        for h in range(2):
            n = int(lengths[0, h])
            ids = again[0, h][again[0, h] >= 0].tolist()
            assert all(i < n for i in ids) and {0, 1, n - 3, n - 2, n - 1} <= set(ids) and len(ids) == 8, name


def test_window_attention_with_lengths_is_each_heads_own_causal_window():
    k, q = rand(1, 2, 20, 4, seed=22), rand(1, 4, 3, 4, seed=23)
    lengths = torch.tensor([[20, 12]])
    got = window_attention(q, k, lengths)
    assert torch.allclose(got[:, :2], dense_window_attention(q[:, :2], k[:, :1]))
    want = dense_window_attention(q[:, 2:], k[:, 1:, :12])
    assert torch.allclose(got[:, 2:, :, :12], want, atol=1e-6) and bool((got[:, 2:, :, 12:] == 0).all())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one of ratio and budget"),
        ({"ratio": 0.5, "budget": 3}, "exactly one"),
        ({"ratio": 1.0}, "ratio must be < 1"),
        ({"ratio": -0.1}, "ratio"),
        ({"budget": 0}, "budget"),
        ({"budget": 4, "sink_tokens": -1}, "sink_tokens"),
        ({"budget": 4, "head_budgets": "greedy"}, "head_budgets"),
    ],
)
def test_bad_compressor_options_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Compressor("knorm", **kwargs)


def test_bad_inputs_are_value_errors():
    k = rand(1, 2, 10, 4)
    with pytest.raises(ValueError, match="values must have the shape"):
        ScoreInputs(k, k[:, :1])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        ScoreInputs(k, k, rand(1, 3, 2, 4))
    with pytest.raises(ValueError, match="longer than the cache"):
        ScoreInputs(k, k, rand(1, 2, 11, 4))
    with pytest.raises(ValueError, match="layer"):
        ScoreInputs(k, k, layer=3, num_layers=2)
    with pytest.raises(ValueError, match="unknown scorer"):
        get_scorer("nope")
    with pytest.raises(ValueError, match="unknown option"):
        get_scorer("snapkv", window=3)
    with pytest.raises(ValueError, match="odd"):
        get_scorer("snapkv", kernel_size=4)
    with pytest.raises(ValueError, match="lengths"):
        ScoreInputs(k, k, lengths=torch.full((1, 2), 11))
    with pytest.raises(ValueError, match="observation window"):
        ScoreInputs(k, k, rand(1, 2, 4, 4), lengths=torch.tensor([[10, 3]]))
