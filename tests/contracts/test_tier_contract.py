"""Every StorageTier through the same checks (host, device, disk, Redis, Redis Cluster)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.kvstore import DeviceTier, DiskTier, HostTier, KVSpec, StorageTier, TierCapabilities, chain_hashes

SPEC = KVSpec("contract", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16)
OTHER = KVSpec("contract-other", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16)
CAP = 8 * 2 * SPEC.block_nbytes  # room for ~8 blocks in every tier (frames add a few hundred bytes)

TIERS = ["host", "device", "disk", pytest.param("redis", marks=pytest.mark.redis), pytest.param("redis_cluster", marks=pytest.mark.redis)]


@pytest.fixture(params=TIERS)
def make_tier(request, tmp_path):
    kind = request.param
    made = []

    def make(capacity=CAP):
        if kind == "host":
            t = HostTier(capacity)
        elif kind == "device":
            t = DeviceTier(capacity, slot_bytes=SPEC.block_nbytes)
        elif kind == "disk":
            t = DiskTier(tmp_path / "disk", capacity)
        else:
            from kvtier.kvstore.tiers.redis import RedisTier

            url = request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster_url")
            t = RedisTier(url, capacity_bytes=capacity)
        made.append(t)
        return t

    make.kind = kind
    yield make
    for t in made:
        t.close()


def blocks(n, seed=0, spec=SPEC):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(spec.block_shape, generator=g).to(spec.torch_dtype) for _ in range(n)]


def keys_for(n, seed=0, spec=SPEC):
    return chain_hashes(spec, [(seed * 7919 + i) % 50000 for i in range(16 * n)])


def test_is_a_storage_tier(make_tier):
    t = make_tier()
    assert isinstance(t, StorageTier)
    assert isinstance(t.capabilities, TierCapabilities)
    assert t.used_bytes == 0 and t.stats().blocks == 0


def test_round_trip_and_out_buffers(make_tier):
    t = make_tier()
    ks, bs = keys_for(4), blocks(4)
    sizes = t.put(ks, bs, spec=SPEC)
    assert all(s > 0 for s in sizes)
    got = t.get(ks, spec=SPEC)
    assert all(torch.equal(g, b) for g, b in zip(got, bs))
    out = [torch.zeros(SPEC.block_shape, dtype=torch.float16) for _ in ks]
    got = t.get(ks, spec=SPEC, out=out)
    assert all(g is o for g, o in zip(got, out)) and all(torch.equal(o, b) for o, b in zip(out, bs))
    # the returned block is the caller's: writing it does not change the stored one
    got[0].zero_()
    assert torch.equal(t.get(ks[:1], spec=SPEC)[0], bs[0])
    s = t.stats()
    assert s.hits == 9 and s.blocks == 4 and s.bytes == t.used_bytes == sum(sizes)


def test_misses_contains_and_prefix(make_tier):
    t = make_tier()
    ks, bs = keys_for(5), blocks(5)
    t.put(ks[:3], bs[:3], spec=SPEC)
    assert t.contains(ks, spec=SPEC) == [True, True, True, False, False]
    assert t.contains_prefix(ks, spec=SPEC) == 3
    assert t.contains_prefix([ks[3]] + ks[:3], spec=SPEC) == 0
    got = t.get(ks, spec=SPEC)
    assert [g is not None for g in got] == [True, True, True, False, False]
    assert t.stats().misses == 2


def test_put_is_idempotent_and_remove_frees(make_tier):
    t = make_tier()
    ks, bs = keys_for(3), blocks(3)
    first = t.put(ks, bs, spec=SPEC)
    used = t.used_bytes
    assert t.put(ks, bs, spec=SPEC) == first and t.used_bytes == used
    assert t.remove(ks[:2] + keys_for(1, seed=9), spec=SPEC) == 2
    assert t.contains(ks, spec=SPEC) == [False, False, True]
    assert t.used_bytes == first[2]
    assert t.remove(ks[:2], spec=SPEC) == 0


def test_capacity_is_never_exceeded(make_tier):
    t = make_tier(capacity=3 * SPEC.block_nbytes + 3 * 1024)
    ks, bs = keys_for(6), blocks(6)
    sizes = t.put(ks, bs, spec=SPEC)
    assert sizes[:3] == [s for s in sizes[:3] if s > 0] and sizes[3:] == [0, 0, 0]
    assert t.used_bytes <= t.capacity_bytes
    assert t.stats().refused == 3


def test_bad_input_raises_and_changes_nothing(make_tier):
    t = make_tier()
    ks, bs = keys_for(2), blocks(2)
    with pytest.raises(ValueError):
        t.put(ks, bs[:1], spec=SPEC)
    with pytest.raises(ValueError):
        t.put(ks, [bs[0], bs[1].float()], spec=SPEC)
    with pytest.raises(ValueError):
        t.put([b"short"] * 2, bs, spec=SPEC)
    with pytest.raises(ValueError):
        t.get(ks, spec=SPEC, out=[torch.zeros(3)] * 2)
    assert t.used_bytes == 0 and t.contains(ks, spec=SPEC) == [False, False]


def test_another_spec_never_reads_a_block(make_tier):
    t = make_tier()
    ks, bs = keys_for(1), blocks(1)
    t.put(ks, bs, spec=SPEC)
    assert t.get(ks, spec=KVSpec("contract", 2, 2, 16, "float16", 32))[0] is None


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "remove"]), st.lists(st.integers(0, 9), min_size=1, max_size=4)), max_size=12))
def test_bytes_and_blocks_are_conserved(make_tier, ops):
    """used_bytes always equals the sum of what put reported for the keys still held."""
    t = make_tier()
    all_keys, all_blocks = keys_for(10, seed=3), blocks(10, seed=3)
    held: dict[bytes, int] = {}
    for op, ids in ops:
        ks = [all_keys[i] for i in dict.fromkeys(ids)]
        if op == "put":
            for k, size in zip(ks, t.put(ks, [all_blocks[all_keys.index(k)] for k in ks], spec=SPEC)):
                if size:
                    held[k] = size
        else:
            assert t.remove(ks, spec=SPEC) == sum(k in held for k in ks)
            for k in ks:
                held.pop(k, None)
        assert t.used_bytes == sum(held.values()) <= t.capacity_bytes
        assert t.stats().blocks == len(held)
        assert t.contains(all_keys, spec=SPEC) == [k in held for k in all_keys]
    t.remove(all_keys, spec=SPEC)
