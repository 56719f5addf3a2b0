"""StoreRetriever over a real TieredStore (host + disk): pages chosen from summaries, only needed blocks read."""

from __future__ import annotations

import pytest
import torch

from kvtier.kvstore import DiskTier, HostTier, KVSpec, TieredStore, chain_hashes
from kvtier.retrieval import StoreRetriever, SummaryStore

SPEC = KVSpec("retrieval-test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_tokens=64)
NUM_BLOCKS = 8


@pytest.fixture
def setup(tmp_path):
    # no promotion on hit: tier hit counters then count exactly the blocks a retrieval reads
    store = TieredStore([HostTier(3 * SPEC.block_nbytes + 4096), DiskTier(tmp_path / "disk", 64 * SPEC.block_nbytes)], promote_on_hit=False)
    keys = chain_hashes(SPEC, list(range(NUM_BLOCKS * SPEC.block_tokens)))
    g = torch.Generator().manual_seed(0)
    blocks = 0.05 * torch.randn(NUM_BLOCKS, *SPEC.block_shape, generator=g)  # [N, L, 2, H_kv, T, D]
    yield store, keys, blocks
    store.close()


def _hits(store):
    return {t["name"]: t["hits"] for t in store.stats()["tiers"]}


def test_retrieve_fetches_only_the_blocks_holding_selected_tokens(setup):
    store, keys, blocks = setup
    # plant one strong key per (layer, head) in blocks 2 (layer 0) and 5 (layer 1), both demoted to disk
    q = torch.zeros(2, 4, 16)
    q[:, :, 3] = 1.0
    blocks[2, 0, 0, :, 10, 3] = 5.0  # layer 0, K, every head, token 10 of block 2 = position 138
    blocks[5, 1, 0, :, 40, 3] = 5.0  # layer 1: position 360
    r = StoreRetriever(store, num_sink=4, num_recent=16)
    assert r.put(SPEC, keys, blocks) == [True] * NUM_BLOCKS
    assert len(r.summaries) == NUM_BLOCKS
    resident = {t["name"]: t["blocks"] for t in store.stats()["tiers"]}
    assert resident["host"] < NUM_BLOCKS  # some blocks live only on disk
    before = sum(_hits(store).values())
    res = r.retrieve(SPEC, keys, q, budget=16 + 4 + 16)  # one free page per (layer, head)
    assert res.num_tokens == NUM_BLOCKS * 64 and res.summarized == 0
    for h in range(2):
        assert 138 in res.token_ids[0, h].tolist() and 360 in res.token_ids[1, h].tolist()
    # blocks read: 0 (sinks), 7 (window), 2 and 5 (the planted pages), nothing else
    assert sorted(keys.index(k) for k in res.fetched) == [0, 2, 5, 7]
    assert sum(_hits(store).values()) - before == 4
    # the gathered K/V are the stored ones
    for L in range(2):
        for h in range(2):
            for j, t in enumerate(res.token_ids[L, h].tolist()):
                if t >= 0:
                    assert torch.equal(res.k[L, h, j], blocks[t // 64, L, 0, h, t % 64])
                    assert torch.equal(res.v[L, h, j], blocks[t // 64, L, 1, h, t % 64])
    assert res.page_ids[0][0] == [0, 8, 31]  # sinks, the planted page, the window


def test_layer_subset_and_missing_summaries(setup):
    store, keys, blocks = setup
    tiny = SummaryStore(max_bytes=3 * 2 * 2 * 4 * 16 * 2 * 3)  # room for three blocks' summaries
    r = StoreRetriever(store, tiny, num_sink=4, num_recent=16)
    r.put(SPEC, keys, blocks)
    assert len(tiny) <= 3 and tiny.used_bytes <= tiny.max_bytes
    q = torch.randn(1, 4, 16)
    res = r.retrieve(SPEC, keys, q, budget=64, layers=[1])
    assert res.summarized == NUM_BLOCKS - 3  # the dropped summaries were recomputed from the blocks
    assert res.token_ids.shape == (1, 2, 64)
    full = StoreRetriever(store, num_sink=4, num_recent=16)
    full.summaries.add_many(keys, blocks)
    assert torch.equal(full.retrieve(SPEC, keys, q, budget=64, layers=[1]).token_ids, res.token_ids)


def test_only_the_cached_prefix_is_searched(setup):
    store, keys, blocks = setup
    r = StoreRetriever(store)
    r.put(SPEC, keys[:3], blocks[:3])
    res = r.retrieve(SPEC, keys, torch.randn(2, 4, 16), budget=64)
    assert res.num_blocks == 3 and res.num_tokens == 192
    assert int(res.token_ids.max()) < 192
    empty = StoreRetriever(store).retrieve(SPEC, chain_hashes(SPEC, list(range(5, 69))), torch.randn(2, 4, 16), budget=64)
    assert empty.num_blocks == 0 and (empty.token_ids == -1).all() and empty.fetched == []


def test_sync_drops_summaries_of_blocks_gone_from_every_tier(setup):
    store, keys, blocks = setup
    r = StoreRetriever(store)
    r.put(SPEC, keys, blocks)  # some blocks were demoted host -> disk: they keep their summary
    assert r.sync() == 0 and len(r.summaries) == NUM_BLOCKS
    store.remove(SPEC, keys[6:])
    assert r.sync() == 2
    assert len(r.summaries) == NUM_BLOCKS - 2 and keys[6] not in r.summaries and keys[5] in r.summaries


def test_bad_input(setup):
    store, keys, blocks = setup
    r = StoreRetriever(store)
    r.put(SPEC, keys, blocks)
    with pytest.raises(ValueError, match=r"q must be \[2, a multiple of 2, 16\]"):
        r.retrieve(SPEC, keys, torch.randn(2, 4, 8), budget=64)
    with pytest.raises(ValueError, match="layers"):
        r.retrieve(SPEC, keys, torch.randn(1, 4, 16), budget=64, layers=[2])
    with pytest.raises(ValueError, match="budget"):
        r.retrieve(SPEC, keys, torch.randn(2, 4, 16), budget=10)
    with pytest.raises(ValueError, match="TieredStore"):
        StoreRetriever(object())
