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


def _until(pred, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


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
    # instance b never saw these blocks, but its shared tier has them (a lookup finds them once
    # Redis has answered b's check: at once unless Redis is slower than shared_lookup_wait_s)
    assert _until(lambda: b.lookup(SPEC, ks).num_blocks == 3)
    assert b.lookup(SPEC, ks).tier_hits["redis"] == 3
    got = b.get(SPEC, ks)
    assert all(torch.equal(g, x) for g, x in zip(got, bs))
    assert b.lookup(SPEC, ks).tier_hits["host"] >= 1  # promoted into b's host tier
    assert b.remove(SPEC, ks) == 3
    assert _until(lambda: a.lookup(SPEC, ks[2:]).num_blocks == 0)


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


def test_lookups_do_not_wait_for_a_slow_redis_beyond_their_bound():
    """Redis asleep (``DEBUG SLEEP``): lookups answer within ``shared_lookup_wait_s`` from what this
    instance saw in Redis (its own writes), under-report a block only another instance wrote, and
    find that block once the check queued meanwhile has been answered; a get reads and verifies it."""
    import threading

    from tests.redis_servers import RedisServer

    server = RedisServer(extra_args=("--enable-debug-command", "yes"))
    try:
        mine = TieredStore(
            [
                TierConfig(HostTier(8 * B), high_watermark=1.0, low_watermark=1.0),
                TierConfig(RedisTier(server.url, socket_timeout_s=10.0), write_through=True),
            ],
            shared_lookup_wait_s=0.05,
        )
        other = make_store(server.url)
        own, theirs = chain(3, seed=21), chain(2, seed=22)
        assert mine.put(SPEC, own, blocks(3, seed=21)) == [True] * 3
        assert other.put(SPEC, theirs, blocks(2, seed=22)) == [True] * 2
        sleeper = threading.Thread(target=lambda: server.client(socket_timeout=10).execute_command("DEBUG", "SLEEP", "2"))
        sleeper.start()
        time.sleep(0.2)  # the server is asleep now
        results = [(mine.lookup(SPEC, own), mine.lookup(SPEC, theirs)) for _ in range(10)]
        assert sleeper.is_alive(), "ten lookups waited for Redis' sleep to end"
        for r_own, r_theirs in results:
            assert r_own.num_blocks == 3 and r_own.tier_prefix["redis"] == 3  # its own writes: known without asking
            assert r_theirs.num_blocks == 0  # only the other instance wrote these: a miss, never wrong KV
        sleeper.join(20)
        # the check queued by those lookups is answered once Redis wakes: the blocks are found
        assert _until(lambda: mine.lookup(SPEC, theirs).tier_prefix["redis"] == 2)
        got = mine.get(SPEC, theirs)
        assert all(torch.equal(g, x) for g, x in zip(got, blocks(2, seed=22)))
        mine.close()
        other.close()
    finally:
        server.close()


def test_lookups_that_never_wait_find_other_instances_blocks_once_checked(redis_url):
    """``shared_lookup_wait_s=0``: a lookup is bookkeeping only; it queues a check, whose answer the
    next lookups see. A block another instance deleted stops being reported the same way."""
    mine = TieredStore(
        [TierConfig(HostTier(2 * B), high_watermark=1.0, low_watermark=1.0), TierConfig(RedisTier(redis_url), write_through=True)],
        shared_lookup_wait_s=0,
    )
    assert not mine.lookup_waits_on_io
    other = make_store(redis_url)
    ks = chain(3, seed=31)
    assert other.put(SPEC, ks, blocks(3, seed=31)) == [True] * 3
    assert _until(lambda: mine.lookup(SPEC, ks).tier_prefix["redis"] == 3)
    assert other.remove(SPEC, ks[1:]) == 2
    assert _until(lambda: mine.lookup(SPEC, ks).tier_prefix["redis"] == 1)
    mine.close()
    other.close()


def test_the_view_learns_other_instances_writes_from_their_announcements(redis_url):
    """With announcements (``publish_invalidations`` / ``listen_invalidations``), what another
    instance writes or deletes reaches this instance's view without any check of its own."""
    mine = RedisTier(redis_url)
    mine.listen_invalidations(lambda keys, deleted: None)
    other = RedisTier(redis_url, publish_invalidations=True)
    ks = chain(2, seed=41)
    time.sleep(0.3)  # the listener reads from now on
    assert mine.contains_cached(ks, spec=SPEC) == [None, None]
    assert all(n > 0 for n in other.put(ks, blocks(2, seed=41), spec=SPEC))
    assert _until(lambda: mine.contains_cached(ks, spec=SPEC) == [True, True])
    assert other.remove(ks[1:], spec=SPEC) == 1
    assert _until(lambda: mine.contains_cached(ks, spec=SPEC) == [True, False])
    mine.close()
    other.close()
