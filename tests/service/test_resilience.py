"""Redis failing under a live service, and memory under a write load of 10x the capacities."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from kvtier.kvstore import KVSpec, Namespace, chain_hashes
from kvtier.service.client import KVTierClient

from .conftest import TINY
from .server import ServiceProcess


def _blocks(n: int, spec: KVSpec = TINY, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *spec.block_shape, generator=torch.Generator().manual_seed(seed)).to(spec.torch_dtype)


def _redis_keys(server) -> int:
    with server.client() as r:
        return sum(1 for _ in r.scan_iter(match=b"kvtier:*"))


def _wait(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.redis
def test_redis_stopped_and_restarted(fresh_redis_server):
    redis = fresh_redis_server
    srv = ServiceProcess({"KVTIER_REDIS_URL": redis.url, "KVTIER_REDIS_RETRY_INTERVAL_S": "0.2", "KVTIER_REDIS_SOCKET_TIMEOUT_S": "0.5"})
    try:
        with KVTierClient(srv.url, timeout=10, retries=0) as c:
            model = c.register_spec(TINY)
            a_keys = chain_hashes(TINY, list(range(64)), Namespace(salt="a"))
            assert c.put(model, a_keys, _blocks(4, seed=1)) == [True] * 4
            assert _redis_keys(redis) == 4  # written through to Redis
            assert httpx.get(srv.url + "/readyz").json()["tiers"]["redis"] == "ok"

            redis.stop()
            t0 = time.monotonic()
            # a lookup waits for Redis at most redis_lookup_wait_s: until a check has failed (and opened
            # the circuit), it may still report the blocks this instance wrote there
            assert _wait(lambda: c.lookup(model, hashes=a_keys).tier_prefix["redis"] == 0)
            for i in range(20):  # the service keeps answering from its other tiers
                hit = c.lookup(model, hashes=a_keys)
                assert hit.num_blocks == 4 and hit.tier_prefix["redis"] == 0
                assert all(torch.equal(g, b) for g, b in zip(c.get(model, a_keys), _blocks(4, seed=1)))
                keys = chain_hashes(TINY, list(range(32)), Namespace(salt=f"down-{i}"))
                assert c.put(model, keys, _blocks(2, seed=i)) == [True, True]
            assert time.monotonic() - t0 < 20
            r = httpx.get(srv.url + "/readyz")
            assert r.status_code == 503 and r.json()["tiers"]["redis"].startswith("unreachable")
            metrics = httpx.get(srv.url + "/metrics").text
            errors = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("kvtier_redis_errors_total")]
            assert errors and errors[0] > 0

            redis.start()  # empty: no persistence
            assert _wait(lambda: httpx.get(srv.url + "/readyz").status_code == 200)
            # the 40 blocks put while Redis was down reach it by themselves: the service retries
            # refused write-throughs in the background (content: tests/kvstore/test_store_redis.py)
            assert _wait(lambda: _redis_keys(redis) >= 40, timeout_s=20)
            for i in (0, 19):
                keys = chain_hashes(TINY, list(range(32)), Namespace(salt=f"down-{i}"))
                assert c.lookup(model, hashes=keys).tier_prefix["redis"] == 2
            metrics = httpx.get(srv.url + "/metrics").text
            retried = [
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith('kvtier_write_through_retried_total{tier="redis"}')
            ]
            assert retried and retried[0] >= 40
            c_keys = chain_hashes(TINY, list(range(48)), Namespace(salt="after"))
            assert c.put(model, c_keys, _blocks(3, seed=9)) == [True] * 3
            assert c.lookup(model, hashes=c_keys).tier_prefix["redis"] == 3  # new writes reach Redis again
            assert srv.alive()
    finally:
        srv.stop()


SUMMARY_CAP = 1 << 20


def test_memory_bounded_under_10x_capacity_writes():
    spec = KVSpec("mem", num_layers=4, num_kv_heads=4, head_dim=64, dtype="float16", block_tokens=64)  # 128 KiB blocks
    caps = {"device": 1 << 20, "host": 2 << 20, "disk": 4 << 20}
    srv = ServiceProcess(
        {
            "KVTIER_DEVICE_CAPACITY_BYTES": str(caps["device"]),
            "KVTIER_HOST_CAPACITY_BYTES": str(caps["host"]),
            "KVTIER_DISK_CAPACITY_BYTES": str(caps["disk"]),
            "KVTIER_MAX_TRACKED_KEYS": "1000",
            "KVTIER_MAX_EVENTS": "2000",
            # page summaries are computed at put and kept in their own LRU-bounded store (64 MiB by default):
            # bound it too, and count it below, so that what is measured is every bounded pool
            "KVTIER_SUMMARY_CAPACITY_BYTES": str(SUMMARY_CAP),
        }
    )
    try:
        total = 10 * sum(caps.values())
        num_blocks = total // spec.block_nbytes  # 280 blocks of 256 KiB
        rss = []
        with KVTierClient(srv.url) as c:
            model = c.register_spec(spec)
            blocks = _blocks(8, spec, seed=3)
            for i in range(num_blocks // 8):
                keys = chain_hashes(spec, list(range(i * 100_000, i * 100_000 + 64 * 8)))
                assert c.put(model, keys, blocks) == [True] * 8
                if i % 7 == 6:
                    for t in c.stats()["tiers"]:
                        assert t["bytes"] <= caps[t["name"]], t
                    rss.append(srv.rss_bytes())
        tiers = {t["name"]: t for t in KVTierClient(srv.url).stats()["tiers"]}
        assert all(tiers[n]["bytes"] <= caps[n] for n in caps)
        assert sum(t["evictions"] for t in tiers.values()) > 0
        # RSS levels off: the last third grows by less than the capacity of the memory tiers
        third = len(rss) // 3
        growth = max(rss[third:]) - rss[third]
        print(f"RSS MiB over the write load: {[r >> 20 for r in rss]}")
        assert growth < caps["device"] + caps["host"] + SUMMARY_CAP + (8 << 20), [r >> 20 for r in rss]
    finally:
        srv.stop()


@pytest.mark.redis
def test_two_instances_share_a_redis_cluster(redis_cluster_url):
    """Redis Cluster joins by URL; a second instance (no block of its own) answers from what the first wrote."""
    env = {"KVTIER_REDIS_URL": redis_cluster_url, "KVTIER_API_KEYS": '{"cluster-key-0001": "acme"}'}
    one, two = ServiceProcess(env), ServiceProcess(env)
    try:
        with KVTierClient(one.url, api_key="cluster-key-0001") as a, KVTierClient(two.url, api_key="cluster-key-0001") as b:
            model = a.register_spec(TINY)
            assert b.register_spec(TINY) == model
            tokens = list(range(16 * 5))
            keys = a.hashes(model, tokens)
            assert keys == b.hashes(model, tokens)
            blocks = _blocks(5, seed=21)
            assert a.put(model, keys, blocks) == [True] * 5
            hit = b.lookup(model, token_ids=tokens)
            assert hit.num_blocks == 5 and hit.tier_hits["redis"] == 5
            assert all(torch.equal(g, x) for g, x in zip(b.get(model, keys), blocks))
            assert httpx.get(two.url + "/readyz").json()["tiers"]["redis"] == "ok"
    finally:
        one.stop()
        two.stop()


@pytest.mark.redis
def test_lookups_that_never_wait_for_redis_find_another_instances_blocks(redis_url, tmp_path):
    """``redis_lookup_wait_s=0``: lookups are bookkeeping only (REST and the local transport answer
    them on their event loop); another instance's blocks are found once announced or checked, and
    read back with the right content."""
    sock = str(tmp_path / "kv.sock")
    one = ServiceProcess({"KVTIER_REDIS_URL": redis_url})
    two = ServiceProcess({"KVTIER_REDIS_URL": redis_url, "KVTIER_REDIS_LOOKUP_WAIT_S": "0", "KVTIER_LOCAL_SOCKET": sock})
    try:
        with KVTierClient(one.url) as a, KVTierClient(two.url) as b, KVTierClient(f"unix://{sock}") as local:
            model = a.register_spec(TINY)
            assert b.register_spec(TINY) == model == local.register_spec(TINY)
            keys = chain_hashes(TINY, list(range(48)), Namespace(salt="no-wait"))
            blocks = _blocks(3, seed=5)
            assert a.put(model, keys, blocks) == [True] * 3
            assert _wait(lambda: b.lookup(model, hashes=keys).tier_prefix["redis"] == 3)
            assert _wait(lambda: local.lookup(model, hashes=keys).num_blocks == 3)
            assert all(torch.equal(g, x) for g, x in zip(local.get(model, keys), blocks))
    finally:
        one.stop()
        two.stop()
