"""Block summaries: Quest bounds are upper bounds of every q.k in a page; the summary store stays bounded."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.retrieval import SummaryStore, page_bounds, quest_scores, summarize_block

floats = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4),  # pages
    st.integers(1, 8),  # D
    st.integers(1, 3),  # query heads
    st.data(),
)
def test_quest_score_bounds_every_key_of_its_page(num_pages, D, G, data):
    P = 4
    k = torch.tensor(data.draw(st.lists(floats, min_size=num_pages * P * D, max_size=num_pages * P * D))).view(num_pages * P, D)
    q = torch.tensor(data.draw(st.lists(floats, min_size=G * D, max_size=G * D))).view(G, D)
    kmin, kmax, kmean = page_bounds(k, P)  # [Np, D]
    bound = quest_scores(q, kmin, kmax)  # [G, Np]
    exact = (q.double() @ k.double().T).view(G, num_pages, P)  # [G, Np, P]
    # float32 rounding of the bound's two products: a relative slack of a few ulps of the magnitudes
    slack = 1e-5 * (q.abs().double() @ k.abs().double().T).view(G, num_pages, P).amax(-1) + 1e-6
    assert (bound.double() + slack >= exact.amax(-1)).all()
    assert torch.allclose(kmean, k.view(num_pages, P, D).mean(1))


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_fp16_summary_rounds_outward(seed):
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(2, 2, 3, 32, 8, generator=g) * 7  # [L, 2, H_kv, T, D]
    s = summarize_block(block, 16, torch.float16)
    kmin, kmax, _ = page_bounds(block[:, 0], 16)
    assert s.kmin.dtype == torch.float16 and s.kmin.shape == (2, 3, 2, 8)
    assert (s.kmin.float() <= kmin).all() and (s.kmax.float() >= kmax).all()
    q = torch.randn(2, 3, 4, 8, generator=g)
    exact = (q @ block[:, 0].transpose(-1, -2)).view(2, 3, 4, 2, 16).amax(-1)
    assert (quest_scores(q, s.kmin, s.kmax) >= exact - 1e-4).all()


def test_summarize_block_bad_input():
    with pytest.raises(ValueError, match=r"\[L, 2, H_kv, T, D\]"):
        summarize_block(torch.zeros(2, 3, 1, 16, 4))
    with pytest.raises(ValueError, match="multiple of page_tokens"):
        summarize_block(torch.zeros(1, 2, 1, 24, 4), 16)


def test_summary_store_is_lru_bounded():
    block = torch.randn(2, 2, 2, 32, 8)
    one = summarize_block(block).nbytes
    store = SummaryStore(max_bytes=3 * one)
    keys = [bytes([i]) * 32 for i in range(5)]
    for key in keys[:3]:
        store.add(key, block)
    assert store.get(keys[0]) is not None  # keys[0] becomes most recent
    store.add(keys[3], block)  # drops keys[1], the least recently used
    assert store.used_bytes <= store.max_bytes and len(store) == 3
    assert store.get(keys[1]) is None and store.get(keys[0]) is not None
    assert store.stats()["dropped"] == 1
    assert store.discard([keys[0], keys[4]]) == 1 and keys[0] not in store
    with pytest.raises(ValueError, match="max_bytes"):
        SummaryStore(max_bytes=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_summary_in_the_blocks_own_dtype_is_exact(dtype):
    """The fast path (block and summary in the same 16-bit dtype): min and max are the keys' own values,
    the mean is the float32 mean rounded once, as page_bounds computes them."""
    g = torch.Generator().manual_seed(5)
    block = (torch.randn(3, 2, 2, 64, 16, generator=g) * 300).to(dtype)
    s = summarize_block(block, 16, dtype)
    kmin, kmax, kmean = page_bounds(block[:, 0], 16)
    assert torch.equal(s.kmin.float(), kmin) and torch.equal(s.kmax.float(), kmax)
    assert torch.equal(s.kmean, kmean.to(dtype))
    assert s.kmin.dtype == dtype and s.kmin.shape == (3, 2, 4, 16) and s.kmean.is_contiguous()
