"""Selectors against brute force: exact top-k, TokenSelect's vote, Quest's pages, centroids, sink+window."""

from __future__ import annotations

import pytest
import torch

from kvtier.retrieval import CachedSelector, get_selector
from kvtier.retrieval.selectors import choose_pages


def _data(seed, B=2, H_q=4, H_kv=2, T=500, D=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H_q, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)


def _brute(scores, budget, num_sink, num_recent):
    """Per row: sinks, window, then the best remaining scores (a Python loop, one token at a time)."""
    B, H, T = scores.shape
    out = torch.full((B, H, budget), -1)
    for b in range(B):
        for h in range(H):
            keep = set(range(num_sink)) | set(range(T - num_recent, T))
            rest = sorted((t for t in range(T) if t not in keep), key=lambda t: (-scores[b, h, t].item(), t))
            keep |= set(rest[: budget - len(keep)])
            ids = sorted(keep)
            out[b, h, : len(ids)] = torch.tensor(ids)
    return out


@pytest.mark.parametrize("budget", [40, 64, 200])
def test_topk_exact_is_brute_force_topk(budget):
    q, k = _data(0)
    sel = get_selector("topk_exact", num_sink=4, num_recent=8)
    s = torch.einsum("bhgd,bhtd->bhgt", q.view(2, 2, 2, 16).double(), k.double()).amax(2)
    assert torch.equal(sel.select(q, k, budget), _brute(s, budget, 4, 8))


def test_tokenselect_is_brute_force_soft_vote():
    q, k = _data(1)
    sel = get_selector("tokenselect", num_sink=2, num_recent=4)
    s = torch.softmax(torch.einsum("bhgd,bhtd->bhgt", q.view(2, 2, 2, 16).double(), k.double()) / 4.0, -1).sum(2)
    assert torch.equal(sel.select(q, k, 50), _brute(s, 50, 2, 4))


def test_ann_exact_backend_equals_topk_exact():
    q, k = _data(2)
    a = get_selector("ann", backend="flat").select(q, k, 100)
    assert torch.equal(a, get_selector("topk_exact").select(q, k, 100))


def test_quest_takes_the_page_of_a_planted_key_and_matches_brute_force_pages():
    q, k = _data(3, B=1, H_q=2, H_kv=1, T=320)
    k = k * 0.1
    k[0, 0, 137] = q[0, 1] * 3  # one key the second query head attends strongly
    sel = get_selector("quest", num_sink=4, num_recent=16)
    ids = sel.select(q, k, 64)[0, 0]
    assert set(range(128, 144)) <= set(ids.tolist())
    # brute force: page upper bound = max over the group of sum_d max(q_d * min_d, q_d * max_d)
    pages = k[0, 0].view(20, 16, 16)
    lo, hi = pages.amin(1), pages.amax(1)
    bound = torch.stack([torch.maximum(qh * lo, qh * hi).sum(-1) for qh in q[0]]).amax(0)  # [20]
    assert torch.allclose(sel.page_scores(q, k)[0, 0], bound, atol=1e-5)
    kept = set(range(4)) | set(range(304, 320))  # sinks and window
    room = 64 - len(kept)
    # the greedy rule: pages in score order while the running total of free tokens fits
    total, chosen = 0, set()
    for p in torch.argsort(bound, descending=True, stable=True).tolist():
        new = set(range(p * 16, p * 16 + 16)) - kept
        if not new:
            continue
        total += len(new)
        if total > room:
            break
        chosen |= new
    assert set(ids[ids >= 0].tolist()) == kept | chosen


@pytest.mark.parametrize("seed", range(40))
def test_quest_select_per_page_equals_the_token_mask_path(seed):
    """Quest.select works on pages (no [B, H_kv, T] masks); it returns exactly the ids of the generic
    path (choose_pages over token masks, then compose), ties and partly reserved pages included."""
    import random

    from kvtier.retrieval.selectors import SelectorBase

    rnd = random.Random(seed)
    T, P = rnd.randint(2, 700), rnd.choice([4, 8, 16])
    ns, nr = rnd.choice([0, 1, 4, 7]), rnd.choice([0, 3, 32, 50])
    budget = rnd.randint(max(1, ns + nr), max(ns + nr + 1, T + 5))
    B, H_kv, G = rnd.choice([1, 2]), rnd.choice([1, 3]), rnd.choice([1, 3])
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H_kv * G, 8, generator=g), torch.randn(rnd.choice([1, B]), H_kv, T, 8, generator=g)
    if seed % 3 == 0:
        k = k.round()  # equal page scores: ties broken by page order in both paths
    sel = get_selector("quest", num_sink=ns, num_recent=nr, page_tokens=P)
    if T > budget and budget < ns + nr:
        return
    state = sel.prepare(k[:, :, : T // 2])  # a state that has to follow the sequence
    assert torch.equal(sel.select(q, k, budget, state), SelectorBase.select(sel, q, k, budget, state))


def test_choose_pages_checks_its_page_count():
    with pytest.raises(ValueError, match="pages"):
        choose_pages(torch.zeros(3), torch.zeros(100, dtype=torch.bool), 16, 10)


def test_centroids_find_a_planted_cluster_flat_and_hierarchical():
    g = torch.Generator().manual_seed(4)
    T, D = 2048, 16
    k = torch.randn(1, 1, T, D, generator=g)
    target = torch.randn(D, generator=g)
    target = 4 * target / target.norm()
    planted = torch.arange(700, 2048, 97)[:12]
    k[0, 0, planted] = target + 0.05 * torch.randn(12, D, generator=g)
    q = target.view(1, 1, D)
    for opts in ({}, {"tokens_per_cluster": 4, "hierarchical_above": 64, "coarse_keep": 0.2}):
        sel = get_selector("centroids", num_sink=4, num_recent=8, **opts)
        state = sel.prepare(k)
        if opts:
            assert state.clusters[0][0].coarse is not None
        ids = sel.select(q, k, 64, state)[0, 0]
        assert set(planted.tolist()) <= set(ids.tolist())
        assert sel.last_scanned < 0.5


def test_sink_window_is_streaming_llm():
    q, k = _data(5, T=100)
    ids = get_selector("sink_window", num_sink=4, num_recent=8).select(q, k, 40)
    assert ids[0, 0].tolist() == list(range(4)) + list(range(64, 100))


def test_cached_selector_counts_and_threshold():
    q, k = _data(6)
    cs = CachedSelector(get_selector("topk_exact"), threshold=0.9, max_entries=2)
    cs.select(q, k, 64, cache_key=0)
    near = q + 0.05 * torch.randn_like(q)
    assert torch.equal(cs.select(near, k, 64, cache_key=0), cs.select(q, k, 64, cache_key=0))
    assert cs.stats()["hits"] == 2
    cs.select(q, k, 80, cache_key=0)  # another budget: a miss
    cs.select(q, k, 64, cache_key=1)
    cs.select(q, k, 64, cache_key=2)  # LRU keeps 2 keys
    assert cs.stats()["entries"] == 2 and cs.misses == 4
    with pytest.raises(ValueError, match="threshold"):
        CachedSelector(get_selector("quest"), threshold=2.0)
