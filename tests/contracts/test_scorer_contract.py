"""Every registered token scorer through one contract, under every head-budget mode.

Each scorer is run with its defaults and a non-default ("hard") set of options. For random caches:
the scores have shape ``[B, H_kv, T]`` and are finite, the inputs are not modified, the selection
is deterministic, respects the budget, always holds the sinks and the recent window, and (uniform
budgets) the kept tokens are the top-scoring ones.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.eviction.tokens import Compressor, ScoreInputs, available_scorers, evicted_ids, get_scorer

CONFIGS = {
    "streaming_llm": [{}],
    "knorm": [{}],
    "snapkv": [{}, {"kernel_size": 1}],
    "pyramidkv": [{}, {"beta": 2.0, "kernel_size": 3}],
    "tova": [{}, {"heads": "group"}],
    "h2o": [{}],
    "expected_attention": [{}, {"cov": False, "epsilon": 0.0}],
}
CASES = [pytest.param(n, o, id=f"{n}-{i}") for n, oo in CONFIGS.items() for i, o in enumerate(oo)]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_scorer_has_a_contract_config():
    assert sorted(CONFIGS) == available_scorers()


def make_inputs(seed: int, B: int, H_kv: int, group: int, T: int, W: int, D: int = 8, layer: int = 1, num_layers: int = 3):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H_kv, T, D, generator=g)
    v = torch.randn(B, H_kv, T, D, generator=g)
    q = torch.randn(B, H_kv * group, W, D, generator=g)
    return ScoreInputs(k, v, q, layer=layer, num_layers=num_layers)


shapes = st.tuples(
    st.integers(0, 10_000), st.integers(1, 2), st.integers(1, 3), st.sampled_from([1, 3]), st.integers(20, 90), st.integers(1, 6)
)


@pytest.mark.parametrize("name,options", CASES)
@given(shape=shapes, ratio=st.sampled_from([0.0, 0.3, 0.75, 0.95]), mode=st.sampled_from(["uniform", "adaptive"]))
@SETTINGS
def test_scorer_contract(name, options, shape, ratio, mode):
    seed, B, H_kv, group, T, W = shape
    inputs = make_inputs(seed, B, H_kv, group, T, W)
    before = [t.clone() for t in (inputs.keys, inputs.values, inputs.queries)]
    sinks, window = 3, 5
    scorer = get_scorer(name, **options)
    scores = scorer.score(inputs)
    assert scores.shape == (B, H_kv, T) and scores.dtype == torch.float32
    assert bool(torch.isfinite(scores).all())
    for a, b in zip(before, (inputs.keys, inputs.values, inputs.queries)):
        assert torch.equal(a, b), "a scorer must not modify its inputs"
    scorer.reset()

    comp = Compressor(get_scorer(name, **options), ratio=ratio, sink_tokens=sinks, window_tokens=window, head_budgets=mode)
    kept = comp.keep(inputs)
    again = Compressor(get_scorer(name, **options), ratio=ratio, sink_tokens=sinks, window_tokens=window, head_budgets=mode).keep(inputs)
    assert torch.equal(kept, again), "selection must be deterministic"
    assert kept.dtype == torch.int64 and kept.shape[:2] == (B, H_kv)
    valid = kept >= 0
    counts = valid.sum(-1)
    # ascending, padding only at the end, ids in range and distinct
    assert bool((valid[..., 1:] <= valid[..., :-1]).all())
    ids = torch.where(valid, kept, T)
    assert bool((ids[..., 1:] > ids[..., :-1])[valid[..., 1:]].all())
    assert int(kept.max()) < T
    # sinks and window always kept
    forced = set(range(sinks)) | set(range(T - window, T))
    for b in range(B):
        for h in range(H_kv):
            assert forced <= set(kept[b, h][valid[b, h]].tolist())
    budget = max(comp.layer_budget(T, inputs.layer, inputs.num_layers), len(forced))
    if mode == "uniform":
        assert bool((counts == min(budget, T)).all())
    else:  # the layer's total is the budget of all its heads
        assert bool((counts.sum(-1) <= H_kv * min(budget, T) + H_kv * len(forced)).all())
        assert bool((counts.sum(-1) >= min(H_kv * budget, H_kv * T)).all())
    # kept + evicted partition the tokens
    ev = evicted_ids(kept, T)
    assert bool(((ev >= 0).sum(-1) + counts == T).all())


@pytest.mark.parametrize("name,options", [c for c in CASES if c.values[0] != "h2o"])
def test_kept_tokens_are_the_top_scoring_ones(name, options):
    inputs = make_inputs(7, 2, 2, 3, 64, 4)
    scores = get_scorer(name, **options).score(inputs)
    kept = Compressor(get_scorer(name, **options), budget=20, sink_tokens=2, window_tokens=4).keep(inputs)
    for b in range(2):
        for h in range(2):
            mask = torch.zeros(64, dtype=torch.bool)
            mask[kept[b, h]] = True
            free = torch.ones(64, dtype=torch.bool)
            free[:2] = False
            free[-4:] = False
            s = scores[b, h]
            if (mask & free).any() and (~mask & free).any():
                assert float(s[mask & free].min()) >= float(s[~mask & free].max())


def test_queries_are_required_where_needed():
    inputs = make_inputs(0, 1, 1, 1, 16, 2)
    no_q = ScoreInputs(inputs.keys, inputs.values, None)
    for name in available_scorers():
        s = get_scorer(name)
        if name in ("streaming_llm", "knorm"):
            assert s.score(no_q).shape == (1, 1, 16)
        else:
            with pytest.raises(ValueError, match="observation window"):
                s.score(no_q)
