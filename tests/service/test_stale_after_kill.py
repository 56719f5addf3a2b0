"""A deleted or rewritten block never comes back after ``kill -9`` of kvtier (issue 17, the soak's stale block).

The cause: a delete that Redis did not confirm (Redis hung, or the tier's circuit open after a
fault) was acknowledged and remembered in memory only. ``kill -9`` forgot it, and the next
process found the old Redis copy and served it: a deleted block came back, or, after a rewrite
whose new bytes were still in a memory tier only, the older version was served as current.
Each test here reproduces that with a real ``redis-server`` (stopped with SIGSTOP, so it holds
the old copy) and a real ``kill -9`` of ``kvtier serve``.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from kvtier.kvstore import KVSpec, Namespace, chain_hashes
from kvtier.service.client import KVTierClient

from .conftest import TINY
from .server import ServiceProcess

pytestmark = pytest.mark.redis


def _blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *TINY.block_shape, generator=torch.Generator().manual_seed(seed)).to(TINY.torch_dtype)


def _keys(n: int, salt: str, spec: KVSpec = TINY) -> list[bytes]:
    return chain_hashes(spec, list(range(spec.block_tokens * n)), Namespace(salt=salt))


def _trip_the_circuit(c: KVTierClient, model: str, redis) -> None:
    """Hang Redis long enough for one read to time out, so the tier's circuit opens (calls degrade
    without touching Redis for ``retry_interval_s``); Redis itself keeps every value it holds."""
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        assert c.get(model, _keys(1, "unknown-block-asks-redis")) == [None]  # times out: Redis is unreachable
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)


def _kill9_and_restart(srv: ServiceProcess) -> None:
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    srv._logf.close()
    srv.start()


@pytest.fixture
def redis_server_env(fresh_redis_server):
    env = {
        "KVTIER_REDIS_URL": fresh_redis_server.url,
        "KVTIER_REDIS_SOCKET_TIMEOUT_S": "0.5",
        "KVTIER_REDIS_RETRY_INTERVAL_S": "60",  # the circuit stays open for the whole test once tripped
    }
    return fresh_redis_server, env


def test_a_delete_redis_did_not_confirm_survives_kill_9(redis_server_env):
    redis, env = redis_server_env
    srv = ServiceProcess(env)
    try:
        with KVTierClient(srv.url, retries=0) as c:
            model = c.register_spec(TINY)
            keys = _keys(2, "deleted-then-killed")
            assert c.put(model, keys, _blocks(2, seed=1)) == [True, True]
            with redis.client() as r:
                assert sum(1 for _ in r.scan_iter(match=b"kvtier:*")) == 2
            _trip_the_circuit(c, model, redis)
            assert c.delete(model, keys[1:]) == 1  # acknowledged; Redis was not told (circuit open)
            with redis.client() as r:
                assert sum(1 for _ in r.scan_iter(match=b"kvtier:*")) == 2  # Redis still holds the old copy
            assert c.get(model, keys[1:]) == [None]
        _kill9_and_restart(srv)
        with KVTierClient(srv.url, retries=0) as c:
            assert c.register_spec(TINY) == model
            assert c.get(model, keys[1:]) == [None]  # the deleted block does not come back
            assert c.lookup(model, hashes=keys).num_blocks == 1
            with redis.client() as r:  # and the restarted process finished the delete in Redis
                deadline = time.monotonic() + 5
                while sum(1 for _ in r.scan_iter(match=b"kvtier:*")) != 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert sum(1 for _ in r.scan_iter(match=b"kvtier:*")) == 1
            got = c.get(model, keys[:1])[0]
            assert got is not None and torch.equal(got, _blocks(2, seed=1)[0])  # the block not deleted is intact
    finally:
        srv.stop()


def test_a_rewrite_held_in_memory_never_lets_the_old_version_back(redis_server_env):
    """Delete, then put other bytes under the same key, while Redis cannot be told; the new bytes are
    in a memory tier only (the default: the disk is not written through) when kvtier is killed.
    They are lost (memory tiers are volatile), but the old version must not be served instead."""
    redis, env = redis_server_env
    srv = ServiceProcess(env)
    try:
        with KVTierClient(srv.url, retries=0) as c:
            model = c.register_spec(TINY)
            key = _keys(1, "rewritten-then-killed")
            old, new = _blocks(1, seed=1), _blocks(1, seed=2)
            assert c.put(model, key, old) == [True]
            _trip_the_circuit(c, model, redis)
            assert c.delete(model, key) == 1
            assert c.put(model, key, new) == [True]  # in the device tier; Redis refused it (circuit open)
            assert torch.equal(c.get(model, key)[0], new[0])
        _kill9_and_restart(srv)
        with KVTierClient(srv.url, retries=0) as c:
            assert c.register_spec(TINY) == model
            got = c.get(model, key)[0]
            assert got is None or torch.equal(got, new[0])  # a miss (lost with the memory tier), never the old bytes
            assert got is None
    finally:
        srv.stop()
