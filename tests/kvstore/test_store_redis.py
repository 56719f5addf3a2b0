"""TieredStore over a real Redis: shared blocks between instances, and Redis going away and back."""

from __future__ import annotations

import time

import pytest
import torch

from kvtier.kvstore import HostTier, KVSpec, TierConfig, TieredStore, chain_hashes
from kvtier.kvstore.tiers.redis import RedisTier

pytestmark = pytest.mark.redis

SPEC = KVSpec("store-redis", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16)
B = SPEC.block_nbytes


def blocks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SPEC.block_shape, generator=g).half() for _ in range(n)]


def chain(n, seed=0):
    return chain_hashes(SPEC, [(seed * 1000 + i) % 50000 for i in range(16 * n)])


def make_store(url, host_blocks=2, **redis_kw):
    return TieredStore(
        [
            TierConfig(HostTier(host_blocks * B), high_watermark=1.0, low_watermark=1.0),
            TierConfig(RedisTier(url, **redis_kw), write_through=True),
        ]
    )


def test_instances_share_blocks_through_redis(redis_url):
    a, b = make_store(redis_url), make_store(redis_url)
    ks, bs = chain(3), blocks(3)
    assert a.put(SPEC, ks, bs) == [True] * 3
    # instance b never saw these blocks, but its shared tier has them
    r = b.lookup(SPEC, ks)
    assert r.num_blocks == 3 and r.tier_hits["redis"] == 3
    got = b.get(SPEC, ks)
    assert all(torch.equal(g, x) for g, x in zip(got, bs))
    assert b.lookup(SPEC, ks).tier_hits["host"] >= 1  # promoted into b's host tier
    assert b.remove(SPEC, ks) == 3 and a.lookup(SPEC, ks[2:]).num_blocks == 0


def test_store_serves_through_a_redis_outage_and_recovers(fresh_redis_server):
    store = make_store(fresh_redis_server.url, host_blocks=2, retry_interval_s=0.3, socket_timeout_s=0.5, connect_timeout_s=0.5)
    ks, bs = chain(4), blocks(4)
    store.put(SPEC, ks, bs)  # host keeps the 2 newest-used, Redis has all 4 (write-through)

    fresh_redis_server.stop()
    t0 = time.monotonic()
    got = store.get(SPEC, ks)  # no exception: what the host has is served, the rest misses
    served = [g is not None for g in got]
    assert any(served) and not all(served)
    for g, x in zip(got, bs):
        assert g is None or torch.equal(g, x)
    new = chain(2, seed=7)
    assert store.put(SPEC, new, blocks(2, seed=7)) == [True, True]  # the host still takes writes
    assert store.lookup(SPEC, new).num_blocks == 2
    assert time.monotonic() - t0 < 5, "calls must not hang while Redis is down"
    redis_stats = store.stats()["tiers"][1]
    assert redis_stats["errors"] >= 1

    fresh_redis_server.start()
    time.sleep(0.4)  # past retry_interval_s: the tier tries again by itself
    later = chain(3, seed=9)
    assert store.put(SPEC, later, blocks(3, seed=9)) == [True] * 3
    assert RedisTier(fresh_redis_server.url).contains(later, spec=SPEC) == [True] * 3


def test_blocks_put_while_redis_is_down_reach_it_when_it_is_back(fresh_redis_server):
    store = make_store(fresh_redis_server.url, host_blocks=8, retry_interval_s=0.3, socket_timeout_s=0.5, connect_timeout_s=0.5)
    fresh_redis_server.stop()
    during, bs = chain(3, seed=11), blocks(3, seed=11)
    assert store.put(SPEC, during, bs) == [True] * 3  # the host takes them; Redis refuses
    redis_stats = store.stats()["tiers"][1]
    assert redis_stats["write_through_pending"] == 3 and redis_stats["errors"] >= 1
    assert store.retry_write_through() == 0  # circuit open: not even tried

    fresh_redis_server.start()
    time.sleep(0.4)  # past retry_interval_s
    after = chain(1, seed=12)
    assert store.put(SPEC, after, blocks(1, seed=12)) == [True]  # this put writes the pending blocks first
    assert store.stats()["tiers"][1]["write_through_pending"] == 0
    assert store.stats()["tiers"][1]["write_through_retried"] == 3
    # another instance sees them, with the right content
    other = make_store(fresh_redis_server.url)
    got = other.get(SPEC, during + after)
    assert all(torch.equal(g, x) for g, x in zip(got, bs + blocks(1, seed=12)))


def test_host_gets_do_not_wait_for_a_slow_redis_write_through():
    """A real Redis made slow (``DEBUG SLEEP`` blocks the server): a put's write-through waits on
    it, while gets the host tier serves, pins and stats go on (the store's lock is not held)."""
    import threading

    from tests.redis_servers import RedisServer

    server = RedisServer(extra_args=("--enable-debug-command", "yes"))
    try:
        store = make_store(server.url, host_blocks=8, socket_timeout_s=10.0)
        a, b = chain(3, seed=1), chain(2, seed=2)
        assert store.put(SPEC, a, blocks(3, seed=1)) == [True] * 3
        sleeper = threading.Thread(target=lambda: server.client(socket_timeout=10).execute_command("DEBUG", "SLEEP", "2"))
        sleeper.start()
        time.sleep(0.2)  # the server is asleep now
        out = []
        put_b = threading.Thread(target=lambda: out.append(store.put(SPEC, b, blocks(2, seed=2))))
        put_b.start()
        time.sleep(0.2)  # b's write-through is waiting on Redis
        t0 = time.monotonic()
        got = store.get(SPEC, a)
        store.pin(SPEC, a, ttl_s=1)
        store.stats()
        waited = time.monotonic() - t0
        assert put_b.is_alive() and not out, "the put did not wait on Redis: the test proves nothing"
        assert waited < 1.0, f"host-tier calls waited {waited:.2f}s while Redis slept"
        assert all(torch.equal(g, x) for g, x in zip(got, blocks(3, seed=1)))
        put_b.join(20)
        sleeper.join(20)
        assert out == [[True, True]]
        assert store.lookup(SPEC, b).tier_prefix["redis"] == 2
        store.close()
    finally:
        server.close()
