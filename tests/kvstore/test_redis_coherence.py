"""RedisTier: deletes Redis did not confirm are remembered (reads miss meanwhile) and sent again;
writes and deletes are announced to other instances through a capped stream."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvtier.kvstore import KVSpec, Namespace, chain_hashes

SPEC = KVSpec("coherence", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16)
pytestmark = pytest.mark.redis


def blocks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SPEC.block_shape, generator=g).half() for _ in range(n)]


def keys(n, salt="k"):
    return chain_hashes(SPEC, list(range(16 * n)), Namespace(salt=salt))


def test_an_unconfirmed_delete_is_a_miss_and_is_sent_again(redis_url, redis_server):
    from kvtier.kvstore.tiers.redis import RedisTier

    tier = RedisTier(redis_url, retry_interval_s=60)
    try:
        ks, bs = keys(2), blocks(2)
        assert all(tier.put(ks, bs, spec=SPEC))
        tier._down_until = time.monotonic() + 60  # the circuit is open (as after a fault): calls degrade
        assert tier.remove(ks[:1], spec=SPEC) == 0 and tier.num_pending_deletes == 1
        tier._down_until = 0.0
        with redis_server.client() as r:
            assert r.exists(tier.redis_key(ks[0], SPEC)) == 1  # Redis still holds it ...
        got = tier.get(ks, spec=SPEC)  # ... but it is deleted: a miss (and the delete is sent again now)
        assert got[0] is None and torch.equal(got[1], bs[1])
        assert tier.contains(ks, spec=SPEC) == [False, True]
        assert tier.num_pending_deletes == 0
        with redis_server.client() as r:
            assert r.exists(tier.redis_key(ks[0], SPEC)) == 0
        # a rewrite of a key whose delete is pending cancels the delete, never loses the new bytes
        tier._down_until = time.monotonic() + 60
        assert tier.remove(ks[1:], spec=SPEC) == 0 and tier.num_pending_deletes == 1
        tier._down_until = 0.0
        new = blocks(1, seed=9)
        assert all(tier.put(ks[1:], new, spec=SPEC))
        assert tier.num_pending_deletes == 0 and torch.equal(tier.get(ks[1:], spec=SPEC)[0], new[0])
    finally:
        tier.close()


def test_writes_and_deletes_are_announced_to_other_instances(redis_url):
    from kvtier.kvstore.tiers.redis import RedisTier

    a, b = RedisTier(redis_url, publish_invalidations=True), RedisTier(redis_url, publish_invalidations=True)
    heard: list[tuple[list[bytes] | None, bool]] = []
    got = threading.Event()

    def on(ks, deleted):
        heard.append((ks, deleted))
        got.set()

    try:
        b.listen_invalidations(on)
        time.sleep(0.3)
        ks = keys(3, "ann")
        assert all(b.put(ks[:1], blocks(1), spec=SPEC))  # b's own: not heard
        assert all(a.put(ks, blocks(3), spec=SPEC))
        assert got.wait(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(heard) < 1:
            time.sleep(0.05)
        assert heard[0] == (ks, False)
        got.clear()
        assert a.remove(ks[1:], spec=SPEC) == 2
        assert got.wait(5) and heard[-1] == (ks[1:], True)
        assert len(heard) == 2
    finally:
        a.close()
        b.close()
