"""EvictingKV: the fast tier under a budget, drop and demote modes, recall of demoted tokens."""

from __future__ import annotations

import math

import pytest
import torch

from kvtier.eviction.tokens import Compressor, EvictingKV
from kvtier.retrieval import get_selector

Hq, H, D = 4, 2, 8


def seq(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(Hq, T, D, generator=g), torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)


def dense(q, k, v, start, allowed=None):
    """Reference: queries at positions start.. over keys 0..pos (causal), optionally only `allowed` [H, T] keys."""
    n, T = q.shape[1], k.shape[1]
    out = torch.zeros(Hq, n, D)
    for h in range(Hq):
        kh, vh = k[h // (Hq // H)], v[h // (Hq // H)]
        for i in range(n):
            p = start + i
            mask = torch.arange(T) <= p
            if allowed is not None:
                mask &= allowed[h // (Hq // H)] | (torch.arange(T) >= start)
            s = (kh[mask] @ q[h, i]) / math.sqrt(D)
            out[h, i] = torch.softmax(s, 0) @ vh[mask]
    return out


def make(mode="drop", budget=24, recall=None, recall_budget=256, **kw):
    return EvictingKV(
        Compressor("snapkv", budget=budget, sink_tokens=2, window_tokens=4),
        num_layers=2,
        num_q_heads=Hq,
        num_kv_heads=H,
        head_dim=D,
        mode=mode,
        observation_window=8,
        recall=recall,
        recall_budget=recall_budget,
        **kw,
    )


def run(kv, q, k, v, chunks):
    outs, a = [], 0
    for b in chunks:
        outs.append(kv.step(0, q[:, a:b], k[:, a:b], v[:, a:b]))
        a = b
    return torch.cat(outs, dim=1)


def test_without_eviction_it_is_exact_causal_attention():
    q, k, v = seq(70)
    kv = make()
    got = run(kv, q, k, v, [30, 50, 51, 52, 70])  # prefill chunks, then single decode steps
    torch.testing.assert_close(got, dense(q, k, v, 0), atol=1e-5, rtol=1e-5)
    assert kv.fast_tokens(0) == [70, 70] and kv.fast_tokens(1) == [0, 0]


def test_drop_mode_attends_over_the_kept_tokens_only():
    q, k, v = seq(60, seed=1)
    kv = make("drop", budget=20)
    run(kv, q, k, v, [50])
    kv.compress(0)
    assert kv.fast_tokens(0) == [20, 20] and kv.demoted_tokens(0) == [0, 0]
    kept = torch.zeros(H, 60, dtype=torch.bool)
    for h in range(H):
        kept[h, kv.fast_positions(0, h)] = True
        assert {0, 1, 46, 47, 48, 49} <= set(kv.fast_positions(0, h).tolist())  # sinks + window
    got = run(kv, q[:, 50:], k[:, 50:], v[:, 50:], [5, 10])
    want = dense(q[:, 50:], k, v, 50, allowed=kept)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_demote_keeps_every_token_and_recall_of_all_is_exact():
    q, k, v = seq(60, seed=2)
    recall = get_selector("topk_exact", num_sink=0, num_recent=0)
    kv = make("demote", budget=20, recall=recall, recall_budget=64)
    run(kv, q, k, v, [50])
    kv.compress()
    for h in range(H):
        fast = kv.fast_positions(0, h).tolist()
        pos, dk, dv = kv.demoted_kv(0, h)
        assert sorted(fast + pos.tolist()) == list(range(50))  # nothing lost
        assert torch.equal(dk, k[h, pos]) and torch.equal(dv, v[h, pos])  # the exact evicted KV
    # the recall budget covers every demoted token: attention equals full attention
    got = run(kv, q[:, 50:], k[:, 50:], v[:, 50:], [4, 5, 10])
    torch.testing.assert_close(got, dense(q[:, 50:], k, v, 50), atol=1e-5, rtol=1e-5)
    assert kv.stats.recalled_tokens > 0 and kv.stats.demoted_tokens == H * 30  # layer 0 only: 50 - 20 per head


def test_demote_with_a_small_recall_budget_recalls_the_best_tokens():
    # one demoted key matches the query strongly: recall with budget 1 finds it, drop loses it
    q, k, v = seq(40, seed=3)
    k[:, 10] = 0
    k[:, 10, 0] = 6.0
    v[:, 10] = 5.0
    recall = get_selector("topk_exact", num_sink=0, num_recent=0)
    res = {}
    for mode in ("drop", "demote"):
        kv = EvictingKV(
            Compressor("streaming_llm", budget=8, sink_tokens=2, window_tokens=6),
            num_layers=1,
            num_q_heads=Hq,
            num_kv_heads=H,
            head_dim=D,
            mode=mode,
            recall=recall if mode == "demote" else None,
            recall_budget=1,
        )
        run(kv, q, k, v, [39])
        kv.compress()
        qq = torch.zeros(Hq, 1, D)
        qq[:, 0, 0] = 6.0
        res[mode] = kv.step(0, qq, k[:, 39:], v[:, 39:])
    assert float(res["demote"].mean()) > 3.0 > float(res["drop"].abs().mean())


def test_trigger_bounds_the_fast_tier_during_a_chunked_prefill():
    q, k, v = seq(200, seed=4)
    kv = make("drop", budget=24, trigger_tokens=40)
    for a in range(0, 200, 16):
        kv.step(0, q[:, a : a + 16], k[:, a : a + 16], v[:, a : a + 16])
        assert max(kv.fast_tokens(0)) <= 40
    assert kv.stats.compressions > 0


def test_lower_tier_is_bounded():
    q, k, v = seq(120, seed=5)
    kv = make(
        "demote",
        budget=10,
        trigger_tokens=20,
        recall=get_selector("topk_exact", num_sink=0, num_recent=0),
        recall_budget=8,
        max_demoted_tokens=30,
    )
    run(kv, q, k, v, list(range(10, 121, 10)))
    assert max(kv.demoted_tokens(0)) <= 30 and kv.stats.dropped_from_lower_tier > 0
    for h in range(H):
        pos, dk, dv = kv.demoted_kv(0, h)
        assert len(set(pos.tolist())) == len(pos) and not set(pos.tolist()) & set(kv.fast_positions(0, h).tolist())
        assert torch.equal(dk, k[h, pos]) and torch.equal(dv, v[h, pos])  # what stayed is exact


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="demote mode needs a recall selector"):
        make("demote")
    with pytest.raises(ValueError, match="mode"):
        make("keep")
    kv = make()
    q, k, v = seq(4)
    with pytest.raises(ValueError, match="q must be"):
        kv.step(0, q[:1], k, v)
    with pytest.raises(ValueError, match="k must be"):
        kv.step(0, q, k[:, :2], v)
    with pytest.raises(ValueError, match="layer"):
        kv.step(5, q, k, v)


def test_append_then_step_equals_stepping_all_along():
    q, k, v = seq(40, seed=6)
    a = make()
    run(a, q, k, v, [30])
    b = make()
    b.append(0, k[:, :30], v[:, :30], q[:, 22:30])
    torch.testing.assert_close(run(a, q[:, 30:], k[:, 30:], v[:, 30:], [10]), run(b, q[:, 30:], k[:, 30:], v[:, 30:], [10]))
    a.compress(0)
    b.compress(0)
    for h in range(H):
        assert torch.equal(a.fast_positions(0, h), b.fast_positions(0, h))  # same observation window, same choice
    with pytest.raises(ValueError, match="q must be"):
        b.append(0, k[:, :3], v[:, :3], q[:, :5])


@pytest.mark.parametrize("selector", ["quest", "ann"])
def test_recall_state_is_extended_not_rebuilt_and_selects_as_a_fresh_one(selector):
    # uniform budgets evict the same count from every head: the demoted set only grows by appends, so the
    # selector's state is built once and extended; its choices equal those of a state built from scratch
    q, k, v = seq(160, seed=6)
    rebuilt = []

    class Fresh:  # the same selector, with a new state on every call (what a rebuild gives)
        def __init__(self):
            self.sel = get_selector(selector, num_sink=0, num_recent=0)

        def prepare(self, k):
            return None

        def select(self, q, k, budget, state=None):
            rebuilt.append(k.shape[2])
            return self.sel.select(q, k, budget, self.sel.prepare(k))

    outs = {}
    for name, recall in (("extended", get_selector(selector, num_sink=0, num_recent=0)), ("fresh", Fresh())):
        kv = make("demote", budget=16, trigger_tokens=24, recall=recall, recall_budget=12)
        outs[name] = run(kv, q, k, v, list(range(8, 161, 8)))
        if name == "extended":
            assert kv.stats.recall_builds == 1 and kv.stats.compressions > 3
    assert len(set(rebuilt)) > 3  # the demoted set grew between recalls
    torch.testing.assert_close(outs["extended"], outs["fresh"], rtol=0, atol=0)


def test_ragged_demotion_rebuilds_the_recall_state():
    q, k, v = seq(120, seed=7)
    kv = EvictingKV(
        Compressor("snapkv", budget=20, sink_tokens=2, window_tokens=4, head_budgets="adaptive"),
        num_layers=1,
        num_q_heads=Hq,
        num_kv_heads=H,
        head_dim=D,
        mode="demote",
        observation_window=8,
        trigger_tokens=28,
        recall=get_selector("quest", num_sink=0, num_recent=0),
        recall_budget=8,
    )
    run(kv, q, k, v, list(range(8, 121, 8)))
    if len(set(kv.demoted_tokens(0))) > 1:  # heads demoted different counts at some point
        assert kv.stats.recall_builds > 1
