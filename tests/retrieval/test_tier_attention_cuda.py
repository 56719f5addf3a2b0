"""TierAttention with the query on a CUDA device: the gathered pages go to the GPU on a copy stream.

The device tests need a CUDA GPU and are skipped without one (this project's CI box has none);
the argument checks run everywhere."""

from __future__ import annotations

import pytest
import torch

from kvtier.kvstore import DiskTier, KVSpec, TierConfig, TieredStore, chain_hashes
from kvtier.retrieval.tier_attention import TierAttention

SPEC = KVSpec("tier-att-cuda", num_layers=2, num_kv_heads=2, head_dim=32, dtype="float16", block_tokens=64)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def stored(tmp_path, n_blocks=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, n_blocks * 64, SPEC.head_dim, generator=g).half()
    blocks = [kv[:, :, :, i * 64 : (i + 1) * 64].contiguous() for i in range(n_blocks)]
    keys = chain_hashes(SPEC, [(seed * 17 + i) % 40000 for i in range(n_blocks * 64)])
    store = TieredStore([TierConfig(DiskTier(tmp_path / "d", 1 << 30, codec="paged"))])
    store.put(SPEC, keys, blocks)
    return store, keys


def test_resident_tokens_on_another_device_than_q_are_a_value_error(tmp_path):
    store, keys = stored(tmp_path, 2)
    att = TierAttention(store, SPEC, budget=64, prefetch=False)
    ctx = att.open(keys)
    q = torch.randn(4, SPEC.head_dim)
    k = torch.empty(2, 3, SPEC.head_dim, device="meta")
    with pytest.raises(ValueError, match="device"):
        att.decode_layer(ctx, 0, q, k, k)


@cuda
@pytest.mark.parametrize("prefetch", [False, True])
def test_decode_on_the_gpu_equals_decode_on_the_cpu_and_copies_only_changed_selections(tmp_path, prefetch):
    store, keys = stored(tmp_path)
    gpu = TierAttention(store, SPEC, budget=128, candidate_blocks=4, full_score_pages=0, prefetch=prefetch)
    cpu = TierAttention(store, SPEC, budget=128, candidate_blocks=4, full_score_pages=0, prefetch=False)
    cg, cc = gpu.open(keys), cpu.open(keys)
    g = torch.Generator().manual_seed(5)
    tail_k, tail_v = (torch.randn(2, 7, SPEC.head_dim, generator=g).half() for _ in range(2))
    qs = [torch.randn(4, SPEC.head_dim, generator=g).half() for _ in range(4)]
    for step, q in enumerate(qs + [qs[-1]]):  # the last step repeats the one before: nothing to copy
        before = gpu.stats().device_copies
        for layer in range(SPEC.num_layers):
            o, lse = gpu.decode_layer(cg, layer, q.cuda(), tail_k.cuda(), tail_v.cuda())
            o_ref, lse_ref = cpu.decode_layer(cc, layer, q.float(), tail_k.float(), tail_v.float())
            assert o.is_cuda and lse.is_cuda
            assert torch.equal(gpu.select(cg, layer, q), cpu.select(cc, layer, q))
            torch.testing.assert_close(o.cpu(), o_ref, atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(lse.cpu(), lse_ref, atol=2e-3, rtol=2e-3)
        if step == len(qs):
            assert gpu.stats().device_copies == before
    s = gpu.stats()
    assert 1 <= s.device_copies <= len(qs) * SPEC.num_layers and s.device_bytes_copied > 0
    assert cg.metadata_bytes()["device_slots"] > 0
    gpu.close()


@cuda
def test_a_prefill_chunk_on_the_gpu_is_attended_like_on_the_cpu(tmp_path):
    store, keys = stored(tmp_path, 8)
    att = TierAttention(store, SPEC, budget=128, prefetch=False)
    ctx = att.open(keys)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(4, 16, SPEC.head_dim, generator=g).half()
    k, v = (torch.randn(2, 16, SPEC.head_dim, generator=g).half() for _ in range(2))
    o, lse = att.prefill_layer(ctx, 0, q.cuda(), k.cuda(), v.cuda())
    o_ref, lse_ref = att.prefill_layer(ctx, 0, q, k, v)
    assert o.is_cuda
    torch.testing.assert_close(o.cpu(), o_ref)
    torch.testing.assert_close(lse.cpu(), lse_ref)
