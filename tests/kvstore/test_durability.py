"""Acknowledged blocks are never dropped silently: failed demotions keep the block (or the put is
refused, counted), and ``flush_to_persistent`` writes what only memory holds to the disk tier."""

from __future__ import annotations

import torch

from kvtier.kvstore import DiskTier, HostTier, KVSpec, Namespace, TierConfig, TieredStore, chain_hashes

SPEC = KVSpec("durable", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16)
B = SPEC.block_nbytes
FULL = 1 << 62  # a disk tier asking this much free space sees its filesystem as full


def blocks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SPEC.block_shape, generator=g).half() for _ in range(n)]


def chain(i):
    return chain_hashes(SPEC, [i * 1000 + t for t in range(16)], Namespace(salt=str(i)))


def test_failed_demotion_keeps_the_block_and_later_puts_are_refused(tmp_path):
    host = HostTier(16 * B)
    disk = DiskTier(tmp_path / "disk", 1000 * (B + 1024), min_free_bytes=FULL)
    store = TieredStore([TierConfig(host), TierConfig(disk)])
    acked = {}
    for i in range(40):  # the report: puts all acknowledged while demotion to a full disk dropped them
        key, block = chain(i)[0], blocks(1, seed=i)[0]
        if store.put(SPEC, [key], [block]) == [True]:
            acked[key] = block
    assert 0 < len(acked) < 40  # the rest were refused at put, not acknowledged and lost
    for key, block in acked.items():
        assert torch.equal(store.get(SPEC, [key])[0], block)
    s = store.stats()
    host_stats = s["tiers"][0]
    assert host_stats["demotion_failures"] > 0 and host_stats["evictions"] == 0
    assert disk.low_space and s["tiers"][1]["blocks"] == 0 and s["tiers"][1]["refused"] > 0

    disk.min_free_bytes = 0  # room on disk again: eviction demotes, new puts land
    assert store.put(SPEC, [chain(100)[0]], blocks(1, seed=100)) == [True]
    assert store.stats()["tiers"][0]["demotions"] > 0
    for key, block in acked.items():
        assert torch.equal(store.get(SPEC, [key])[0], block)


def test_flush_to_persistent_survives_a_reopen(tmp_path):
    def open_store():
        return TieredStore([TierConfig(HostTier(64 * B)), TierConfig(DiskTier(tmp_path / "disk", 1000 * (B + 1024)))])

    store = open_store()
    keys = chain_hashes(SPEC, list(range(16 * 8)), Namespace(salt="flush"))
    data = blocks(8, seed=7)
    assert store.put(SPEC, keys, data) == [True] * 8
    assert store.stats()["tiers"][1]["blocks"] == 0  # only in memory so far
    assert store.flush_to_persistent() == {"flushed": 8, "failed": 0}
    assert store.flush_to_persistent() == {"flushed": 0, "failed": 0}  # nothing left that only memory holds
    store.close()

    again = open_store()
    again.register_spec(SPEC)  # adopts what the disk holds
    assert again.lookup(SPEC, keys).num_blocks == 8
    assert all(torch.equal(g, b) for g, b in zip(again.get(SPEC, keys), data))


def test_flush_to_a_full_disk_reports_failures(tmp_path):
    disk = DiskTier(tmp_path / "disk", 1000 * (B + 1024), min_free_bytes=FULL)
    store = TieredStore([TierConfig(HostTier(64 * B)), TierConfig(disk)])
    keys = chain_hashes(SPEC, list(range(16 * 3)), Namespace(salt="full"))
    assert store.put(SPEC, keys, blocks(3)) == [True] * 3
    assert store.flush_to_persistent() == {"flushed": 0, "failed": 3}
    assert store.lookup(SPEC, keys).num_blocks == 3  # still served from memory
