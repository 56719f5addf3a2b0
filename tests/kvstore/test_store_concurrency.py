"""TieredStore under concurrency: the lock covers bookkeeping only, so a slow tier write never
delays a lookup or a get another tier serves; the async API; invariants after concurrent traffic.

The slow device is a ``DiskTier`` whose writes wait on a gate the test opens: a real disk cannot
be made slow on demand, and a gate (rather than a sleep) makes "the write is still in progress"
a fact the test checks, not a timing it hopes for. (The Redis case, with a real server made slow by
``DEBUG SLEEP``, is in test_store_redis.py.)
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from kvtier.kvstore import DiskTier, HostTier, KVSpec, Namespace, TierConfig, TieredStore, chain_hashes

SPEC = KVSpec("conc", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16)
B = SPEC.block_nbytes


def blocks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SPEC.block_shape, generator=g).half() for _ in range(n)]


def chain(n, seed=0):
    return chain_hashes(SPEC, [(seed * 1000 + i) % 50000 for i in range(16 * n)], Namespace())


class GatedDiskTier(DiskTier):
    """A disk tier whose writes wait until ``gate`` is set (a test fixture standing in for a slow device)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.writing = threading.Event()  # set once a write is waiting on the gate

    def put(self, keys, blocks, *, spec, first=None):
        if not self.gate.is_set():
            self.writing.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return super().put(keys, blocks, spec=spec, first=first)


def where(store, keys):
    masks = store.index.residency_of(keys)
    return ["".join(n[0] for t, n in enumerate(store.tier_names) if m & (1 << t)) or "-" for m in masks.tolist()]


def run_within(fn, timeout=20.0):
    """``fn()`` on a thread; its result if it finished within ``timeout`` seconds (AssertionError otherwise)."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), "the call waited on the slow tier's write"
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_lookup_and_host_get_do_not_wait_for_a_slow_write_through(tmp_path):
    disk = GatedDiskTier(tmp_path, 100 * (B + 1024))
    store = TieredStore([TierConfig(HostTier(20 * B)), TierConfig(disk, write_through=True)])
    a, b = chain(4, seed=1), chain(3, seed=2)
    assert store.put(SPEC, a, blocks(4, seed=1)) == [True] * 4
    disk.gate.clear()
    put_b = threading.Thread(target=lambda: out.append(store.put(SPEC, b, blocks(3, seed=2))))
    out = []
    put_b.start()
    assert disk.writing.wait(20)  # b's write-through is now stuck in the disk
    r = run_within(lambda: store.lookup(SPEC, a + b))
    got = run_within(lambda: store.get(SPEC, a))
    assert put_b.is_alive() and not out  # all of the above happened while the write was in progress
    assert r.tier_prefix["host"] >= 4 and r.tier_prefix["disk"] == 4
    assert all(torch.equal(g, x) for g, x in zip(got, blocks(4, seed=1)))
    assert run_within(lambda: store.stats())["blocks"] >= 4
    assert run_within(lambda: store.pin(SPEC, a, ttl_s=5)).num_pinned == 4
    disk.gate.set()
    put_b.join(20)
    assert out == [[True] * 3]
    assert where(store, b) == ["hd"] * 3
    store.index.check_invariants()
    store.close()


def test_demotion_to_a_slow_disk_does_not_block_gets_from_the_host(tmp_path):
    disk = GatedDiskTier(tmp_path, 100 * (B + 1024))
    store = TieredStore([TierConfig(HostTier(4 * B), high_watermark=1.0, low_watermark=1.0), TierConfig(disk)])
    a, b = chain(4, seed=1), chain(2, seed=2)
    store.put(SPEC, a, blocks(4, seed=1))
    disk.gate.clear()
    out = []
    put_b = threading.Thread(target=lambda: out.append(store.put(SPEC, b, blocks(2, seed=2))))
    put_b.start()
    assert disk.writing.wait(20)  # a's two deepest blocks are being demoted to the disk
    got = run_within(lambda: store.get(SPEC, a[:2]))
    assert all(torch.equal(g, x) for g, x in zip(got, blocks(2, seed=1)))
    assert run_within(lambda: store.lookup(SPEC, a)).num_blocks == 4  # the victims stay readable until they land
    assert put_b.is_alive() and not out
    disk.gate.set()
    put_b.join(20)
    assert out == [[True, True]]
    assert where(store, a) == ["h", "h", "d", "d"] and where(store, b) == ["h", "h"]
    got = store.get(SPEC, a)  # and every byte arrived
    assert all(torch.equal(g, x) for g, x in zip(got, blocks(4, seed=1)))
    store.index.check_invariants()
    store.close()


def test_async_api_returns_futures_and_rejects_bad_input_at_once(tmp_path):
    store = TieredStore([TierConfig(HostTier(8 * B)), TierConfig(DiskTier(tmp_path, 100 * (B + 1024)))])
    ks, bs = chain(3, seed=3), blocks(3, seed=3)
    assert store.put_async(SPEC, ks, bs).result(10) == [True] * 3
    out = [torch.empty(SPEC.block_shape, dtype=torch.float16) for _ in ks]
    got = store.get_async(SPEC, ks, out=out).result(10)
    assert got[0] is out[0] and all(torch.equal(g, b) for g, b in zip(got, bs))
    with pytest.raises(ValueError, match="one block per key"):
        store.put_async(SPEC, ks, bs[:2])
    with pytest.raises(ValueError, match="32-byte"):
        store.get_async(SPEC, [b"short"])
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.get_async(SPEC, ks)


def test_concurrent_traffic_keeps_capacities_and_the_index_consistent(tmp_path):
    """Eight threads put, get, pin and remove over a small host tier spilling into a small disk:
    afterwards each tier holds exactly what the index says, no tier went above its capacity, and
    every block read was the block written."""
    host = HostTier(6 * B)
    disk = DiskTier(tmp_path, 16 * (B + 600))
    store = TieredStore([TierConfig(host, high_watermark=0.9, low_watermark=0.6), TierConfig(disk)])
    errors = []
    peaks = {"host": 0, "disk": 0}

    def worker(w):
        rnd = random.Random(w)
        try:
            for _ in range(150):
                seed = w * 5 + rnd.randrange(4)  # each thread its own chains (seeds < 50: chain() wraps there)
                n = rnd.randint(1, 3)
                ks, bs = chain(n, seed=seed), blocks(n, seed=seed)
                op = rnd.random()
                if op < 0.45:
                    store.put(SPEC, ks, bs)
                elif op < 0.85:
                    for g, b in zip(store.get(SPEC, ks), bs):
                        assert g is None or torch.equal(g, b), "wrong KV"
                elif op < 0.93:
                    store.remove(SPEC, ks)
                else:
                    store.pin(SPEC, ks, ttl_s=0.05)
                peaks["host"] = max(peaks["host"], host.used_bytes)
                peaks["disk"] = max(peaks["disk"], disk.used_bytes)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors[0]
    assert peaks["host"] <= host.capacity_bytes and peaks["disk"] <= disk.capacity_bytes
    store.index.check_invariants()
    for t, tier in enumerate([host, disk]):
        keys = set(tier.keys() if hasattr(tier, "keys") else tier.iter_keys())
        held = {
            store.index.key(s)
            for s in range(len(store.index._keys))
            if store.index._keys[s] is not None and store.index.residency(s) & (1 << t)
        }
        assert keys == held
        assert len(store._tiers[t].policy) == len(keys)
    st = store.stats()
    assert all(t["bytes"] <= t["capacity_bytes"] for t in st["tiers"])
    assert sum(st["tenant_bytes"].values()) == len(store.index) * B - sum(
        B for s in range(len(store.index._keys)) if store.index._keys[s] is not None and store.index.residency(s) == 0
    )
    store.close()
