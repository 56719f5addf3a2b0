"""TieredStore: placement, eviction with demotion, promotion, watermarks, pins, quotas, events."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.kvstore import DiskTier, HostTier, KVSpec, Namespace, TierConfig, TieredStore, chain_hashes

SPEC = KVSpec("store", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16)
B = SPEC.block_nbytes


def blocks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SPEC.block_shape, generator=g).half() for _ in range(n)]


def chain(n, seed=0, tenant=""):
    return chain_hashes(SPEC, [(seed * 1000 + i) % 50000 for i in range(16 * n)], Namespace(tenant=tenant))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def two_tier(tmp_path, host_blocks=4, disk_blocks=100, **kw):
    host = HostTier(host_blocks * B)
    disk = DiskTier(tmp_path / "disk", disk_blocks * (B + 1024))
    return TieredStore([TierConfig(host, high_watermark=1.0, low_watermark=1.0), TierConfig(disk)], **kw)


def where(store, keys):
    masks = store.index.residency_of(keys)
    return ["".join(n[0] for t, n in enumerate(store.tier_names) if m & (1 << t)) or "-" for m in masks.tolist()]


def test_put_get_lookup_round_trip(tmp_path):
    store = two_tier(tmp_path)
    ks, bs = chain(3), blocks(3)
    assert store.put(SPEC, ks, bs) == [True] * 3
    got = store.get(SPEC, ks)
    assert all(torch.equal(g, b) for g, b in zip(got, bs))
    r = store.lookup(SPEC, ks + chain(2, seed=5))
    assert r.num_blocks == 3 and r.tier_hits == {"host": 3, "disk": 0} and r.tier_prefix == {"host": 3, "disk": 0}
    store.index.check_invariants()


def test_eviction_demotes_leaf_first_and_get_promotes(tmp_path):
    store = two_tier(tmp_path, host_blocks=4)
    a = chain(4, seed=1)
    store.put(SPEC, a, blocks(4, seed=1))
    b = chain(2, seed=2)
    store.put(SPEC, b, blocks(2, seed=2))
    # chain a was least recent; its deepest blocks left the host first (a block whose child is
    # still in a tier is never evicted before that child), and went to disk (write-back)
    assert where(store, a) == ["h", "h", "d", "d"]
    assert where(store, b) == ["h", "h"]
    s = {t["name"]: t for t in store.stats()["tiers"]}
    assert s["host"]["evictions"] == 2 and s["host"]["demotions"] == 2 and s["disk"]["blocks"] == 2
    # a get from disk is promoted back to the host, and the host evicts to make room
    got = store.get(SPEC, a)
    assert all(torch.equal(g, x) for g, x in zip(got, blocks(4, seed=1)))
    assert where(store, a)[2:] == ["hd", "hd"]
    assert store.stats()["tiers"][1]["promotions"] == 2
    assert store.stats()["tiers"][0]["bytes"] <= 4 * B
    store.index.check_invariants()


def test_watermarks_give_hysteresis(tmp_path):
    host = HostTier(10 * B)
    store = TieredStore([TierConfig(host, high_watermark=0.9, low_watermark=0.5), TierConfig(DiskTier(tmp_path, 100 * (B + 1024)))])
    for i in range(9):
        store.put(SPEC, chain(1, seed=10 + i), blocks(1, seed=i))
    assert host.used_bytes == 9 * B  # at the high watermark, nothing evicted yet
    store.put(SPEC, chain(1, seed=30), blocks(1))
    # above high: brought down to low (5 blocks) minus the incoming one, then the new block stored
    assert host.used_bytes == 5 * B
    assert store.stats()["tiers"][0]["evictions"] == 5


def test_write_through_writes_every_tier_at_once(tmp_path):
    host = HostTier(2 * B)
    disk = DiskTier(tmp_path, 100 * (B + 1024))
    store = TieredStore([TierConfig(host, high_watermark=1.0, low_watermark=1.0), TierConfig(disk, write_through=True)])
    ks = chain(3)
    store.put(SPEC, ks, blocks(3))
    assert where(store, ks) == ["hd", "hd", "d"]
    assert store.stats()["tiers"][0]["demotions"] == 0  # nothing to write back: disk had it


def test_refused_write_through_is_written_later(tmp_path):
    host = HostTier(10 * B)
    disk = DiskTier(tmp_path, 2 * (B + 1024))
    store = TieredStore(
        [
            TierConfig(host, high_watermark=1.0, low_watermark=1.0),
            TierConfig(disk, write_through=True, high_watermark=1.0, low_watermark=1.0),
        ]
    )
    a, b = chain(2, seed=1), chain(2, seed=2)
    store.put(SPEC, a, blocks(2, seed=1))
    lease = store.pin(SPEC, a, ttl_s=60)  # disk is full of pinned blocks: b's write-through is refused
    bb = blocks(2, seed=2)
    assert store.put(SPEC, b, bb) == [True, True]
    assert where(store, b) == ["h", "h"]
    st = store.stats()["tiers"][1]
    assert st["write_through_pending"] == 2 and st["write_through_retried"] == 0
    assert store.retry_write_through() == 0  # still no room: nothing lands, nothing is lost
    assert store.stats()["tiers"][1]["write_through_pending"] == 2
    store.unpin(lease.id)
    assert store.retry_write_through() == 2
    assert where(store, b) == ["hd", "hd"]
    st = store.stats()["tiers"][1]
    assert st["write_through_pending"] == 0 and st["write_through_retried"] == 2
    assert disk.used_bytes <= disk.capacity_bytes
    got = DiskTier(tmp_path, 2 * (B + 1024)).get(b, spec=SPEC)  # what reached the disk is the block
    assert all(torch.equal(g, x) for g, x in zip(got, bb))


def test_refused_write_through_list_is_bounded(tmp_path):
    host = HostTier(20 * B)
    disk = DiskTier(tmp_path, B // 2)  # takes nothing
    store = TieredStore(
        [TierConfig(host, high_watermark=1.0, low_watermark=1.0), TierConfig(disk, write_through=True)],
        max_write_through_pending=3,
        write_through_retry_batch=2,
    )
    for i in range(5):
        assert store.put(SPEC, chain(1, seed=40 + i), blocks(1, seed=i)) == [True]
    st = store.stats()["tiers"][1]
    assert st["write_through_pending"] == 3 and st["write_through_dropped"] == 2 and st["write_through_retried"] == 0
    store.remove(SPEC, chain(1, seed=42))  # the oldest pending, gone everywhere: forgotten at the next retry
    assert store.retry_write_through() == 0
    assert store.stats()["tiers"][1]["write_through_pending"] == 2
    for bad in ({"max_write_through_pending": -1}, {"write_through_retry_batch": 1.5}):
        with pytest.raises(ValueError, match="non-negative int"):
            TieredStore([HostTier(B)], **bad)
    with pytest.raises(ValueError, match="limit"):
        store.retry_write_through(limit=-1)


def test_block_larger_than_top_tier_goes_below(tmp_path):
    store = two_tier(tmp_path, host_blocks=0)
    ks = chain(2)
    assert store.put(SPEC, ks, blocks(2)) == [True, True]
    assert where(store, ks) == ["d", "d"]


def test_full_store_refuses_without_raising(tmp_path):
    store = TieredStore([TierConfig(HostTier(2 * B), high_watermark=1.0, low_watermark=1.0)])
    a = chain(2, seed=1)
    store.put(SPEC, a, blocks(2))
    store.pin(SPEC, a, ttl_s=60)
    assert store.put(SPEC, chain(1, seed=2), blocks(1)) == [False]
    assert store.lookup(SPEC, a).num_blocks == 2


def test_pins_block_eviction_until_they_expire(tmp_path):
    clock = FakeClock()
    store = two_tier(tmp_path, host_blocks=2, clock=clock)
    a = chain(2, seed=1)
    store.put(SPEC, a, blocks(2))
    lease = store.pin(SPEC, a, ttl_s=10)
    assert lease.num_pinned == 2
    store.put(SPEC, chain(2, seed=2), blocks(2))
    assert where(store, a) == ["h", "h"]  # pinned: the new blocks went to disk instead
    clock.now = 11  # the lease expired
    store.put(SPEC, chain(2, seed=3), blocks(2))
    assert where(store, a) == ["d", "d"]
    assert store.num_leases == 0
    with pytest.raises(ValueError):
        store.pin(SPEC, a, ttl_s=0)
    lease = store.pin(SPEC, a, ttl_s=5)
    assert store.unpin(lease.id) and not store.unpin(lease.id)


def test_tenant_quota_evicts_own_blocks_first(tmp_path):
    store = two_tier(tmp_path, host_blocks=20, quotas={"a": 3 * B})
    a1 = chain(3, seed=1, tenant="a")
    b1 = chain(3, seed=2, tenant="b")
    store.put(SPEC, a1, blocks(3), tenant="a")
    store.put(SPEC, b1, blocks(3), tenant="b")
    a2 = chain(2, seed=3, tenant="a")
    assert store.put(SPEC, a2, blocks(2), tenant="a") == [True, True]
    assert store.tenant_bytes("a") == 3 * B
    # tenant a's own oldest leaves went (deepest first); tenant b is untouched
    assert where(store, a1) == ["h", "-", "-"]
    assert where(store, b1) == ["h", "h", "h"]
    assert store.stats()["quota_evictions"] == 2
    with pytest.raises(ValueError):
        TieredStore([HostTier(B)], quotas={"x": -1})


def test_quota_refuses_when_own_blocks_are_pinned(tmp_path):
    store = two_tier(tmp_path, host_blocks=20, quotas={"a": 2 * B})
    a1 = chain(2, seed=1, tenant="a")
    store.put(SPEC, a1, blocks(2), tenant="a")
    store.pin(SPEC, a1, ttl_s=60)
    assert store.put(SPEC, chain(1, seed=2, tenant="a"), blocks(1), tenant="a") == [False]
    assert store.stats()["quota_refusals"] == 1


def test_event_stream_has_monotonic_ids(tmp_path):
    store = two_tier(tmp_path, host_blocks=2)
    store.put(SPEC, chain(2, seed=1), blocks(2))
    store.put(SPEC, chain(1, seed=2), blocks(1))
    evs = store.events()
    ids = [e.id for e in evs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    kinds = [(e.kind, e.tier) for e in evs]
    assert kinds.count(("stored", "host")) == 3 and ("removed", "host") in kinds and ("stored", "disk") in kinds
    assert store.events(after=ids[2]) == evs[3:]
    assert store.events(after=ids[0], limit=1) == evs[1:2]
    assert store.last_event_id == ids[-1]


def test_bounded_event_stream(tmp_path):
    store = TieredStore([HostTier(100 * B)], max_events=5)
    for i in range(10):
        store.put(SPEC, chain(1, seed=i), blocks(1))
    assert len(store.events()) == 5 and store.events()[0].id == 6


def test_bad_input_changes_nothing(tmp_path):
    store = two_tier(tmp_path)
    ks = chain(2)
    with pytest.raises(ValueError):
        store.put(SPEC, ks, blocks(1))
    with pytest.raises(ValueError):
        store.put(SPEC, ks, [blocks(1)[0], torch.zeros(3)])
    with pytest.raises(ValueError):
        store.put(SPEC, [b"x"] * 2, blocks(2))
    with pytest.raises(ValueError):
        store.get(SPEC, ks, out=[torch.zeros(1)])
    assert store.lookup(SPEC, ks).num_blocks == 0 and store.stats()["blocks"] == 0 and store.events() == []


def test_remove_and_disk_restart_readopts(tmp_path):
    store = two_tier(tmp_path, host_blocks=0)
    ks = chain(3)
    store.put(SPEC, ks, blocks(3))
    assert store.remove(SPEC, ks[2:]) == 1
    store.close()
    store2 = two_tier(tmp_path, host_blocks=4)
    store2.register_spec(SPEC)
    assert store2.lookup(SPEC, ks).num_blocks == 2
    assert all(torch.equal(g, b) for g, b in zip(store2.get(SPEC, ks[:2]), blocks(2)))


def test_stacked_batch_and_out_buffers(tmp_path):
    store = two_tier(tmp_path)
    ks, bs = chain(2), torch.stack(blocks(2))
    assert store.put(SPEC, ks, bs) == [True, True]
    out = [torch.empty(SPEC.block_shape, dtype=torch.float16) for _ in ks]
    got = store.get(SPEC, ks, out=out)
    assert got[0] is out[0] and torch.equal(out[1], bs[1])


@pytest.mark.parametrize("policy", ["lru", "lfu", "s3fifo", "cost", "tenant_fair"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "get", "remove", "pin"]), st.integers(0, 5), st.integers(1, 4)), max_size=25))
def test_capacities_and_index_invariants_hold(tmp_path_factory, policy, ops):
    """Whatever the policy and sequence of operations: no tier above capacity, the index agrees with the tiers."""
    tmp = tmp_path_factory.mktemp("prop")
    host = HostTier(5 * B)
    disk = DiskTier(tmp, 12 * (B + 600))
    store = TieredStore([TierConfig(host, policy=policy, high_watermark=0.9, low_watermark=0.6), TierConfig(disk, policy=policy)])
    for op, seed, n in ops:
        ks = chain(n, seed=seed)
        if op == "put":
            store.put(SPEC, ks, blocks(n, seed=seed))
        elif op == "get":
            for g, b in zip(store.get(SPEC, ks), blocks(n, seed=seed)):
                assert g is None or torch.equal(g, b)  # never wrong KV
        elif op == "remove":
            store.remove(SPEC, ks)
        else:
            store.pin(SPEC, ks, ttl_s=1)
        assert host.used_bytes <= host.capacity_bytes and disk.used_bytes <= disk.capacity_bytes
        store.index.check_invariants()
        for t, tier in enumerate([host, disk]):
            keys = set(tier.keys() if hasattr(tier, "keys") else tier.iter_keys())
            held = {
                store.index.key(s)
                for s in range(len(store.index._keys))
                if store.index._keys[s] is not None and store.index.residency(s) & (1 << t)
            }
            assert keys == held
            policy = store._tiers[t].policy  # the policy tracks exactly what the tier holds
            assert len(policy) == len(keys) and all(k in policy for k in keys)
