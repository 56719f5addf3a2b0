"""RedisTier against real redis-servers (single node, TLS, 3-node cluster) started by the tests."""

from __future__ import annotations

import logging
import os
import signal
import time

import hiredis
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.kvstore import KVSpec, chain_hashes, encode_frame
from kvtier.kvstore.codecs import base as codec_base
from kvtier.kvstore.codecs.base import tensor_bytes, tensor_from_bytes
from kvtier.kvstore.tiers import redis as redis_tier
from kvtier.kvstore.tiers.redis import RedisTier
from tests import redis_servers

pytestmark = pytest.mark.redis

SPEC = KVSpec("m", 2, 2, 16, "float16", 16)
OTHER = KVSpec("other-model", 2, 2, 16, "float16", 16)
FAST = dict(socket_timeout_s=0.5, connect_timeout_s=0.5, retry_interval_s=0.3)


def blocks(n, seed=0, spec=SPEC):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(spec.block_shape, generator=g).to(spec.torch_dtype) for _ in range(n)]


def chain(n, seed=0, spec=SPEC):
    return chain_hashes(spec, [(seed * 7919 + i) % 50000 for i in range(spec.block_tokens * n)])


def same(got, want):
    return len(got) == len(want) and all(g is not None and torch.equal(g, w) for g, w in zip(got, want))


@pytest.fixture
def tier(redis_url):
    t = RedisTier(redis_url, **FAST)
    yield t
    t.close()


# -- round trips -----------------------------------------------------------------------------
def test_round_trip_single_node(tier, redis_server):
    ks, bs = chain(5), blocks(5)
    sizes = tier.put(ks, bs, spec=SPEC)
    client = redis_server.client()
    # bytes per block = the frame's length, which is what Redis holds
    assert sizes == [client.strlen(tier.redis_key(k, SPEC)) for k in ks] and all(s > SPEC.block_nbytes for s in sizes)
    assert same(tier.get(ks, spec=SPEC), bs)
    s = tier.stats()
    assert (s.puts, s.blocks, s.bytes, s.hits, s.misses, s.errors) == (5, 5, sum(sizes), 5, 0, 0)
    assert tier.capabilities == redis_tier.TierCapabilities(
        device="redis", persistent=True, shared=True, framed=True, iterable=True, range_reads=True
    )


def test_round_trip_tls(redis_tls_server):
    assert redis_tls_server.url.startswith("rediss://127.0.0.1:")
    t = RedisTier(redis_tls_server.url, ssl_ca_certs=redis_tls_server.ca_cert, **FAST)
    ks, bs = chain(3, seed=1), blocks(3, seed=1)
    assert all(t.put(ks, bs, spec=SPEC))
    assert same(t.get(ks, spec=SPEC), bs)
    assert t.remove(ks, spec=SPEC) == 3
    t.close()
    # without our CA the server's certificate does not verify: a degraded call, not an exception
    untrusted = RedisTier(redis_tls_server.url, **FAST)
    assert untrusted.get(ks, spec=SPEC) == [None] * 3 and untrusted.stats().errors == 1
    untrusted.close()


def test_round_trip_cluster_spreads_blocks_over_nodes(redis_cluster_url, redis_cluster):
    t = RedisTier(redis_cluster_url, **FAST)
    ks, bs = chain(24, seed=2), blocks(24, seed=2)
    assert all(t.put(ks, bs, spec=SPEC))
    assert same(t.get(ks, spec=SPEC), bs)
    out = [torch.zeros(SPEC.block_shape, dtype=torch.float16) for _ in ks]
    assert all(g is o for g, o in zip(t.get(ks, spec=SPEC, out=out), out)) and same(out, bs)
    assert t.contains(ks, spec=SPEC) == [True] * 24 and t.contains_prefix(ks, spec=SPEC) == 24
    per_node = [len(list(s.client().scan_iter(match=f"kvtier:{SPEC.short_fingerprint}:*"))) for s in redis_cluster.servers]
    assert sum(per_node) == 24 and sum(n > 0 for n in per_node) >= 2, per_node  # no hash tag: spread
    assert sorted(t.iter_keys(SPEC)) == sorted(ks)
    assert t.remove(ks[:10], spec=SPEC) == 10 and t.contains(ks, spec=SPEC) == [False] * 10 + [True] * 14
    t.close()


def test_get_into_out_buffers(tier):
    ks, bs = chain(3), blocks(3)
    tier.put(ks, bs, spec=SPEC)
    out = [torch.zeros(SPEC.block_shape, dtype=torch.float16) for _ in ks]
    got = tier.get(ks, spec=SPEC, out=out)
    assert all(g is o for g, o in zip(got, out)) and same(out, bs)
    got[0].zero_()  # the caller's tensor: writing it changes nothing stored
    assert same(tier.get(ks[:1], spec=SPEC), bs[:1])


def test_missing_keys_are_misses_and_leave_out_untouched(tier):
    ks, bs = chain(4), blocks(4)
    tier.put([ks[0], ks[2]], [bs[0], bs[2]], spec=SPEC)
    out = [torch.full(SPEC.block_shape, 7.0, dtype=torch.float16) for _ in ks]
    got = tier.get(ks, spec=SPEC, out=out)
    assert [g is not None for g in got] == [True, False, True, False]
    assert torch.all(out[1] == 7) and torch.all(out[3] == 7)
    assert (tier.stats().hits, tier.stats().misses) == (2, 2)
    assert tier.get([], spec=SPEC) == [] and tier.put([], [], spec=SPEC) == [] and tier.contains([], spec=SPEC) == []


def test_contains_and_contains_prefix(tier):
    ks, bs = chain(5), blocks(5)
    tier.put(ks[:3] + ks[4:], bs[:3] + bs[4:], spec=SPEC)
    assert tier.contains(ks, spec=SPEC) == [True, True, True, False, True]
    assert tier.contains_prefix(ks, spec=SPEC) == 3
    assert tier.contains_prefix(ks[3:], spec=SPEC) == 0
    assert tier.contains(ks, spec=OTHER) == [False] * 5  # another model never sees these


def test_remove_counts_only_present_keys(tier):
    ks, bs = chain(4), blocks(4)
    sizes = tier.put(ks, bs, spec=SPEC)
    assert tier.remove(ks[:2] + chain(1, seed=5), spec=SPEC) == 2
    assert tier.contains(ks, spec=SPEC) == [False, False, True, True]
    assert tier.used_bytes == sum(sizes[2:]) and tier.stats().removed == 2 and tier.stats().blocks == 2
    assert tier.remove(ks[:2], spec=SPEC) == 0


def test_put_again_rewrites_and_counts_once(tier):
    ks, bs = chain(2), blocks(2)
    first = tier.put(ks, bs, spec=SPEC)
    assert tier.put(ks, bs, spec=SPEC) == first
    assert tier.used_bytes == sum(first) and tier.stats().blocks == 2


def test_ttl_expires_blocks(redis_url, redis_server):
    t = RedisTier(redis_url, ttl_s=0.5, **FAST)
    ks, bs = chain(2), blocks(2)
    t.put(ks, bs, spec=SPEC)
    assert 0 < redis_server.client().pttl(t.redis_key(ks[0], SPEC)) <= 500
    assert same(t.get(ks, spec=SPEC), bs)
    deadline = time.monotonic() + 5
    while any(t.contains(ks, spec=SPEC)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert t.get(ks, spec=SPEC) == [None, None]
    assert t.used_bytes == 0  # misses of keys it wrote drop them from its accounting
    no_ttl = RedisTier(redis_url)
    no_ttl.put(ks, bs, spec=SPEC)
    assert redis_server.client().pttl(no_ttl.redis_key(ks[0], SPEC)) == -1


def test_capacity_refuses_and_frees(redis_url):
    probe = RedisTier(redis_url)
    frame_bytes = probe.put(chain(1, seed=9), blocks(1), spec=SPEC)[0]
    t = RedisTier(redis_url, capacity_bytes=2 * frame_bytes + 10, **FAST)
    ks, bs = chain(3), blocks(3)
    assert t.put(ks, bs, spec=SPEC) == [frame_bytes, frame_bytes, 0]
    assert t.stats().refused == 1 and t.used_bytes == 2 * frame_bytes <= t.capacity_bytes
    assert t.contains(ks, spec=SPEC) == [True, True, False]  # a refused block is not written
    assert t.put(ks[:1], bs[:1], spec=SPEC) == [frame_bytes]  # a re-put fits: same bytes
    t.remove(ks[:1], spec=SPEC)
    assert t.put(ks[2:], bs[2:], spec=SPEC) == [frame_bytes]
    assert t.used_bytes == 2 * frame_bytes


def test_capacity_forgets_expired_blocks(redis_url):
    frame_bytes = RedisTier(redis_url).put(chain(1, seed=9), blocks(1), spec=SPEC)[0]
    t = RedisTier(redis_url, capacity_bytes=frame_bytes, ttl_s=0.2, **FAST)
    ks, bs = chain(2), blocks(2)
    assert t.put(ks[:1], bs[:1], spec=SPEC) == [frame_bytes]
    assert t.put(ks[1:], bs[1:], spec=SPEC) == [0]
    time.sleep(0.3)
    assert t.put(ks[1:], bs[1:], spec=SPEC) == [frame_bytes]  # the expired one no longer counts


def test_keys_are_per_model_and_scannable(tier, redis_server):
    ks, bs = chain(3), blocks(3)
    other_ks, other_bs = chain(2, spec=OTHER), blocks(2, spec=OTHER)
    tier.put(ks, bs, spec=SPEC)
    tier.put(other_ks, other_bs, spec=OTHER)
    client = redis_server.client()
    found = set(client.scan_iter(match=f"kvtier:{SPEC.short_fingerprint}:*"))
    assert found == {f"kvtier:{SPEC.short_fingerprint}:{k.hex()}".encode() for k in ks}
    assert len(set(client.scan_iter(match=f"kvtier:{OTHER.short_fingerprint}:*"))) == 2
    assert all(b"{" not in k and b"}" not in k for k in client.scan_iter(match="kvtier:*"))  # no hash tags
    assert sorted(tier.iter_keys(SPEC)) == sorted(ks) and sorted(tier.iter_keys(OTHER)) == sorted(other_ks)


def test_big_frames_and_many_pipelines(redis_url, monkeypatch):
    """Frames above the packer's cutoff travel as separate buffers; puts flush pipelines by size."""
    spec = KVSpec("big", 4, 4, 64, "float16", 64)  # 256 KiB blocks
    monkeypatch.setattr(redis_tier, "_PIPELINE_BYTES", 600 << 10)  # ~2 frames per pipeline
    t = RedisTier(redis_url, **FAST)
    ks, bs = chain(7, spec=spec), blocks(7, spec=spec)
    assert all(t.put(ks, bs, spec=spec))
    assert same(t.get(ks, spec=spec), bs)


# -- corrupt frames --------------------------------------------------------------------------
def _frame(key, block, spec):
    return encode_frame(key, spec, "identity", {}, spec.block_shape, spec.dtype, tensor_bytes(block))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "other_key", "other_spec", "empty"])
def test_corrupt_frames_are_deleted_misses(tier, redis_server, damage, caplog):
    ks, bs = chain(3), blocks(3)
    tier.put(ks, bs, spec=SPEC)
    client, victim = redis_server.client(), tier.redis_key(ks[1], SPEC)
    good = client.get(victim)
    if damage == "garbage":
        client.set(victim, os.urandom(300))
    elif damage == "truncated":
        client.set(victim, good[: len(good) - 100])
    elif damage == "flipped":
        client.set(victim, good[:-1] + bytes([good[-1] ^ 1]))
    elif damage == "other_key":
        client.set(victim, _frame(ks[0], bs[0], SPEC))
    elif damage == "other_spec":
        other = KVSpec("m", 2, 2, 16, "float16", 32)
        client.set(victim, _frame(ks[1], torch.zeros(other.block_shape, dtype=torch.float16), other))
    elif damage == "empty":
        client.set(victim, b"")
    with caplog.at_level(logging.WARNING, logger="kvtier.kvstore.tiers.redis"):
        got = tier.get(ks, spec=SPEC)
    assert got[1] is None and same([got[0], got[2]], [bs[0], bs[2]])
    assert client.exists(victim) == 0
    s = tier.stats()
    assert (s.corrupt, s.misses, s.hits, s.errors) == (1, 1, 2, 0)
    assert "corrupt" in caplog.text


def test_a_foreign_value_type_is_a_miss_and_overwritten(tier, redis_server):
    ks, bs = chain(2), blocks(2)
    tier.put(ks, bs, spec=SPEC)
    client, victim = redis_server.client(), tier.redis_key(ks[1], SPEC)
    client.delete(victim)
    client.rpush(victim, b"x")  # MGET answers nil for a list: a plain miss
    got = tier.get(ks, spec=SPEC)
    assert got[1] is None and same(got[:1], bs[:1])
    assert tier.put(ks[1:], bs[1:], spec=SPEC)[0] > 0 and same(tier.get(ks, spec=SPEC), bs)


def test_codec_named_in_the_frame_decodes(redis_url, redis_server):
    """A tier reads blocks written with another codec: the frame names the codec to use."""

    class Negate:  # a lossless toy codec: the payload is the negated block
        name = "test-negate"
        lossless = True

        def encode(self, block, spec):
            return tensor_bytes(-block), {"negated": True}

        def decode(self, payload, meta, spec, out=None):
            assert meta == {"negated": True}
            t = -tensor_from_bytes(payload, spec.torch_dtype, spec.block_shape)
            return t if out is None else out.copy_(t)

    codec_base.register_codec("test-negate", Negate)
    try:
        writer = RedisTier(redis_url, codec="test-negate")
        reader = RedisTier(redis_url)  # identity
        assert writer.codec.name == "test-negate" and reader.codec.name == "identity"
        ks, bs = chain(2), blocks(2)
        writer.put(ks[:1], bs[:1], spec=SPEC)
        reader.put(ks[1:], bs[1:], spec=SPEC)
        assert same(reader.get(ks, spec=SPEC), bs) and same(writer.get(ks, spec=SPEC), bs)
        raw = redis_server.client().get(writer.redis_key(ks[0], SPEC))
        assert b"test-negate" in raw[:1000]
        # a frame naming a codec nobody registered is unusable: a counted, deleted miss
        codec_base._CODECS.unregister("test-negate")
        fresh = RedisTier(redis_url)
        assert fresh.get(ks, spec=SPEC)[0] is None and fresh.stats().corrupt == 1
        assert fresh.contains(ks, spec=SPEC) == [False, True]
    finally:
        codec_base._CODECS.unregister("test-negate")


# -- faults ----------------------------------------------------------------------------------
def test_outage_degrades_then_recovers_by_itself(fresh_redis_server, caplog):
    server = fresh_redis_server
    t = RedisTier(server.url, **FAST)
    ks, bs = chain(4), blocks(4)
    assert all(t.put(ks, bs, spec=SPEC))

    server.stop()
    limit = FAST["connect_timeout_s"] + FAST["socket_timeout_s"] + 0.5
    with caplog.at_level(logging.WARNING, logger="kvtier.kvstore.tiers.redis"):
        for _ in range(3):  # the first call fails fast (refused), the next ones hit the open circuit
            t0 = time.monotonic()
            assert t.get(ks, spec=SPEC) == [None] * 4
            assert t.put(chain(2, seed=3), blocks(2, seed=3), spec=SPEC) == [0, 0]
            assert t.contains(ks, spec=SPEC) == [False] * 4 and t.contains_prefix(ks, spec=SPEC) == 0
            assert t.remove(ks[:1], spec=SPEC) == 0
            assert time.monotonic() - t0 < limit
        time.sleep(FAST["retry_interval_s"] + 0.05)
        assert t.get(ks, spec=SPEC) == [None] * 4  # tried again, still down
    s = t.stats()
    assert s.errors >= 15 and s.misses == 16 and s.hits == 0
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert 1 <= len(unreachable) <= 2, "warnings must be rate-limited, not one per call"

    server.start()  # an empty Redis (no persistence) on the same port
    time.sleep(FAST["retry_interval_s"] + 0.05)
    later, later_bs = chain(3, seed=4), blocks(3, seed=4)
    assert all(t.put(later, later_bs, spec=SPEC))
    assert same(t.get(later, spec=SPEC), later_bs)
    assert t.get(ks, spec=SPEC) == [None] * 4  # what the restart lost is simply missing


def test_redis_maxmemory_refuses_without_faults(fresh_redis_server):
    client = fresh_redis_server.client()
    client.config_set("maxmemory", 1_500_000)
    client.config_set("maxmemory-policy", "noeviction")
    t = RedisTier(fresh_redis_server.url, **FAST)
    ks, bs = chain(600), blocks(600)  # ~2.5 MB of frames
    sizes = t.put(ks, bs, spec=SPEC)
    assert sizes[0] > 0 and sizes[-1] == 0
    s = t.stats()
    assert s.refused == sizes.count(0) > 0 and s.errors == 0 and s.bytes == sum(sizes)


def test_cluster_node_outage_degrades_and_recovers(fresh_redis_cluster):
    cluster = fresh_redis_cluster
    t = RedisTier(cluster.url, **FAST)
    ks, bs = chain(12, seed=6), blocks(12, seed=6)
    assert all(t.put(ks, bs, spec=SPEC))
    victim = cluster.servers[1]
    on_victim = {bytes.fromhex(k.decode().rsplit(":", 1)[1]) for k in victim.client().scan_iter(match="kvtier:*")}
    assert 0 < len(on_victim) < 12

    victim.stop()
    t0 = time.monotonic()
    assert t.get(ks, spec=SPEC) == [None] * 12  # no exception
    assert t.put(ks[:2], bs[:2], spec=SPEC) == [0, 0]
    assert time.monotonic() - t0 < 3 and t.stats().errors >= 2

    victim.start()  # same port and node id (nodes.conf); it lost its blocks (no persistence)
    deadline = time.monotonic() + 15
    while True:  # until a get passes without a fault (the node answers CLUSTERDOWN while it rejoins)
        time.sleep(FAST["retry_interval_s"] + 0.05)
        errors = t.stats().errors
        got = t.get(ks, spec=SPEC)
        if t.stats().errors == errors or time.monotonic() > deadline:
            break
    assert [g is not None for g in got] == [k not in on_victim for k in ks]
    assert same([g for g in got if g is not None], [b for b, k in zip(bs, ks) if k not in on_victim])
    assert t.stats().corrupt == 0  # CLUSTERDOWN replies while the node rejoined are faults, not corruption
    assert all(t.put(ks, bs, spec=SPEC)) and same(t.get(ks, spec=SPEC), bs)


def test_concurrent_callers_share_one_tier(tier):
    import threading

    errors = []

    def worker(seed):
        try:
            ks, bs = chain(6, seed=seed), blocks(6, seed=seed)
            for _ in range(5):
                assert all(tier.put(ks, bs, spec=SPEC))
                assert same(tier.get(ks, spec=SPEC), bs)
            assert tier.remove(ks[:3], spec=SPEC) == 3
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    s = tier.stats()
    assert s.blocks == 8 * 3 and s.hits == 8 * 5 * 6 and s.errors == 0


def test_a_hung_server_costs_at_most_the_socket_timeout(fresh_redis_server):
    server = fresh_redis_server
    t = RedisTier(server.url, socket_timeout_s=0.3, connect_timeout_s=0.3, retry_interval_s=0.2)
    ks, bs = chain(2), blocks(2)
    t.put(ks, bs, spec=SPEC)
    os.kill(server.proc.pid, signal.SIGSTOP)  # accepts connections (kernel), answers nothing
    try:
        t0 = time.monotonic()
        assert t.get(ks, spec=SPEC) == [None, None]
        assert time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        assert t.put(ks, bs, spec=SPEC) == [0, 0]  # circuit open: immediate
        assert time.monotonic() - t0 < 0.1
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    time.sleep(0.25)
    assert same(t.get(ks, spec=SPEC), bs)


def test_unreachable_at_construction_is_not_an_error(redis_servers_free_port):
    for url in (f"redis://127.0.0.1:{redis_servers_free_port}/0", f"redis+cluster://127.0.0.1:{redis_servers_free_port}"):
        t = RedisTier(url, **FAST)  # nothing listens there
        ks = chain(2)
        assert t.get(ks, spec=SPEC) == [None, None] and t.put(ks, blocks(2), spec=SPEC) == [0, 0]
        assert t.stats().errors == 2
        t.close()


@pytest.fixture
def redis_servers_free_port():
    return redis_servers.free_port()


# -- API -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url, kw",
    [
        ("http://127.0.0.1:6379", {}),
        ("127.0.0.1:6379", {}),
        ("redis://", {}),
        ("redis://127.0.0.1:99999", {}),
        ("redis+cluster://127.0.0.1:7000/3", {}),
        ("redis://127.0.0.1:6379", {"ttl_s": 0}),
        ("redis://127.0.0.1:6379", {"ttl_s": -1}),
        ("redis://127.0.0.1:6379", {"socket_timeout_s": 0}),
        ("redis://127.0.0.1:6379", {"connect_timeout_s": float("nan")}),
        ("redis://127.0.0.1:6379", {"retry_interval_s": -1}),
        ("redis://127.0.0.1:6379", {"max_connections": 0}),
        ("redis://127.0.0.1:6379", {"capacity_bytes": -1}),
        ("redis://127.0.0.1:6379", {"codec": "no-such-codec"}),
        ("redis://127.0.0.1:6379", {"codec": 3}),
        ("redis://127.0.0.1:6379", {"name": ""}),
        ("redis://127.0.0.1:6379", {"ssl_ca_certs": "/etc/hostname"}),  # not a TLS url
        ("rediss://127.0.0.1:6379", {"ssl_ca_certs": "/no/such/ca.pem"}),
    ],
)
def test_bad_options_raise_value_error(url, kw):
    with pytest.raises(ValueError):
        RedisTier(url, **kw)


def test_bad_calls_raise_and_change_nothing(tier):
    ks, bs = chain(2), blocks(2)
    with pytest.raises(ValueError):
        tier.put(ks, bs[:1], spec=SPEC)
    with pytest.raises(ValueError):
        tier.put([b"short", b"keys"], bs, spec=SPEC)
    with pytest.raises(ValueError):
        tier.get(ks, spec=SPEC, out=[torch.zeros(3)] * 2)
    with pytest.raises(ValueError):
        tier.contains([b"short"], spec=SPEC)
    assert tier.contains(ks, spec=SPEC) == [False, False] and tier.stats().errors == 0
    tier.close()
    with pytest.raises(RuntimeError):
        tier.get(ks, spec=SPEC)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40_000), st.text(max_size=20), st.integers(-(2**63), 2**63 - 1)), min_size=0, max_size=4))
def test_packer_writes_what_hiredis_writes(args):
    """The zero-copy packer emits exactly the RESP bytes of redis-py's default (hiredis) packer."""
    cmd = (b"SET", *args)
    ours = b"".join(bytes(p) for p in redis_tier._ZeroCopyPacker().pack(*cmd))
    assert ours == hiredis.pack_command(tuple(a if isinstance(a, (bytes, str)) else str(a) for a in cmd))


def test_packer_splits_a_command_name_with_spaces():
    assert (
        b"".join(redis_tier._ZeroCopyPacker().pack("CLIENT SETINFO", "LIB-NAME", "x"))
        == b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$8\r\nLIB-NAME\r\n$1\r\nx\r\n"
    )


# -- the fixtures' marker semantics -----------------------------------------------------------
@pytest.mark.parametrize("ci, outcome", [("", pytest.skip.Exception), ("true", pytest.fail.Exception), ("1", pytest.fail.Exception)])
def test_missing_redis_skips_locally_and_fails_on_ci(monkeypatch, tmp_path, ci, outcome):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no redis-server
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="redis-server"):
        redis_servers.require_binaries("redis-server")
