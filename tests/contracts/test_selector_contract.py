"""Every registered selector (and CachedSelector around it) through the same contract.

For any q, k and budget: indices ``[B, H_kv, budget]`` int64; the valid ids are strictly
ascending, in ``[0, T)`` and followed only by ``-1``; at most ``budget`` of them; the sinks and
the recent window are always among them; every token when ``T <= budget``; the same input gives
the same output (a fresh selector, a prepared state, or the throw-away state); a state follows the
sequence as it grows; bad input is a ValueError.
"""

from __future__ import annotations

import pytest
import torch

from kvtier.retrieval import CachedSelector, available_selectors, get_selector

# Each registered selector with its defaults (small windows for the small shapes here) and a
# non-default set of options.
CONFIGS = {
    "topk_exact": [{}],
    "tokenselect": [{}, {"scale": 0.5}],
    "quest": [{}, {"page_tokens": 8}, {"refine": 4}],
    "ann": [
        {"backend": "exact"},
        {"backend": "flat"},
        {"backend": "hnsw", "index_options": {"m": 8, "ef_search": 32}},
        {"backend": "ivf", "index_options": {"nlist": 8, "nprobe": 2, "min_train": 64}},
    ],
    "centroids": [{}, {"tokens_per_cluster": 8, "hierarchical_above": 8, "coarse_keep": 0.5}],
    "sink_window": [{}],
}
CASES = [pytest.param(name, opts, id=f"{name}-{i}") for name, optss in CONFIGS.items() for i, opts in enumerate(optss)]
WINDOWS = [(4, 8), (0, 0), (2, 0), (0, 16)]


def test_every_selector_is_covered():
    assert set(CONFIGS) == set(available_selectors())


def _data(seed: int, B=2, H_q=6, H_kv=2, T=300, D=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H_q, D, generator=g)  # [B, H_q, D]
    k = torch.randn(B, H_kv, T, D, generator=g)  # [B, H_kv, T, D]
    return q, k


def _check_ids(ids: torch.Tensor, B: int, H_kv: int, T: int, budget: int, num_sink: int, num_recent: int) -> None:
    assert ids.shape == (B, H_kv, budget) and ids.dtype == torch.int64
    for row in ids.reshape(-1, budget):
        valid = row[row >= 0]
        n = valid.numel()
        assert (row[n:] == -1).all(), "padding comes after the ids"
        assert (valid[1:] > valid[:-1]).all(), "ids strictly ascending"
        assert n == 0 or (valid.min() >= 0 and valid.max() < T)
        assert n <= budget
        must = set(range(min(num_sink, T))) | set(range(max(0, T - num_recent), T))
        assert must <= set(valid.tolist()), "sinks and recent window always kept"
        if T <= budget:
            assert valid.tolist() == list(range(T))


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("num_sink,num_recent", WINDOWS)
def test_contract(name, opts, num_sink, num_recent):
    q, k = _data(0)
    B, H_kv, T = q.shape[0], k.shape[1], k.shape[2]
    for budget in (num_sink + num_recent + 17, 64, T, T + 5):
        sel = get_selector(name, num_sink=num_sink, num_recent=num_recent, **opts)
        a = sel.select(q, k, budget)
        _check_ids(a, B, H_kv, T, budget, num_sink, num_recent)
        if budget < T:
            # every selector except the page-granular ones fills its budget on random data
            n = (a >= 0).sum(-1)
            assert (n > num_sink + num_recent).all(), "the selector picks something beyond sinks and window"
        state = get_selector(name, num_sink=num_sink, num_recent=num_recent, **opts).prepare(k)
        b = get_selector(name, num_sink=num_sink, num_recent=num_recent, **opts).select(q, k, budget, state)
        assert torch.equal(a, b), "deterministic: prepared state == throw-away state == a fresh run"
        assert torch.equal(a, sel.select(q, k, budget)), "deterministic across calls"


@pytest.mark.parametrize("name,opts", CASES)
def test_shared_keys_broadcast(name, opts):
    """A batch of 1 in k serves every query row, as if k were repeated."""
    q, k = _data(1, B=3, T=200)
    k1 = k[:1]
    sel = get_selector(name, **opts)
    shared = sel.select(q, k1, 64)
    rep = get_selector(name, **opts).select(q, k1.expand(3, -1, -1, -1).contiguous(), 64)
    assert torch.equal(shared, rep)


@pytest.mark.parametrize("name,opts", CASES)
def test_state_follows_growth(name, opts):
    """A state prepared for the first T0 tokens keeps working as the sequence grows."""
    q, k = _data(2, T=260)
    sel = get_selector(name, **opts)
    state = sel.prepare(k[:, :, :200])
    for T in (200, 201, 230, 260):
        ids = sel.select(q, k[:, :, :T], 64, state)
        _check_ids(ids, 2, 2, T, 64, sel.num_sink, sel.num_recent)


@pytest.mark.parametrize("name,opts", CASES)
def test_cached_selector_contract(name, opts):
    q, k = _data(3)
    cs = CachedSelector(get_selector(name, **opts), threshold=0.99)
    first = cs.select(q, k, 96, cache_key="layer0")
    same = cs.select(q * 1.5, k, 96, cache_key="layer0")  # cosine 1: a hit
    assert torch.equal(first, same) and cs.hits == 1 and cs.misses == 1
    grown = torch.cat([k, torch.randn(2, 2, 3, 16)], 2)
    ids = cs.select(q, grown, 96, cache_key="layer0")  # hit: the window moves with the new tokens
    _check_ids(ids, 2, 2, grown.shape[2], 96, cs.selector.num_sink, cs.selector.num_recent)
    other = cs.select(-q, k, 96, cache_key="layer0")  # dissimilar: a miss, recomputed
    assert cs.misses == 2
    assert torch.equal(other, get_selector(name, **opts).select(-q, k, 96))


@pytest.mark.parametrize("name,opts", CASES)
def test_bad_input(name, opts):
    q, k = _data(4)
    sel = get_selector(name, **opts)
    with pytest.raises(ValueError, match="budget"):
        sel.select(q, k, 10)  # below num_sink + num_recent
    with pytest.raises(ValueError, match="budget"):
        sel.select(q, k, 0)
    with pytest.raises(ValueError, match="H_q"):
        sel.select(q[:, :5], k, 64)
    with pytest.raises(ValueError, match="head_dim"):
        sel.select(q[..., :8], k, 64)
    with pytest.raises(ValueError, match="k must be"):
        sel.select(q, k[0], 64)
    with pytest.raises(ValueError, match="batch"):
        sel.select(q, torch.cat([k, k[:1]]), 64)


def test_unknown_selector_and_bad_options():
    with pytest.raises(ValueError, match="unknown selector"):
        get_selector("nope")
    with pytest.raises(ValueError, match="num_sink"):
        get_selector("quest", num_sink=-1)
    with pytest.raises(ValueError, match="unknown index backend"):
        get_selector("ann", backend="lsh")
