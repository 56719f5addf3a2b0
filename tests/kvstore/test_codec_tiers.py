"""Lossy codecs inside the tiers and the store: each tier takes its own codec, frames with lossy
payloads round-trip within the codec's bound, and a payload its codec rejects is a counted miss."""

from __future__ import annotations

import pytest
import torch

from kvtier.kvstore import DiskTier, HostTier, KVSpec, TierConfig, TieredStore, chain_hashes, encode_frame
from kvtier.kvstore.codecs import codec_max_error, get_codec
from kvtier.kvstore.codecs.kivi import KiviCodec

SPEC = KVSpec("codec-tiers", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=32)
CODECS = ["fp8", "int8", "kivi4", "kivi2h", "kivi4+zstd", "int8+lz4"]


def blocks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SPEC.block_shape, generator=g).half() for _ in range(n)]


def keys(n, seed=0):
    return chain_hashes(SPEC, [(seed * 31 + i) % 40000 for i in range(SPEC.block_tokens * n)])


def within_bound(codec, got, want):
    return bool(((got.float() - want.float()).abs() <= codec_max_error(codec, want, SPEC)).all())


def make(kind, codec, tmp_path, request):
    if kind == "host":
        return HostTier(1 << 22, codec=codec)
    if kind == "disk":
        return DiskTier(tmp_path / "disk", 1 << 22, codec=codec)
    from kvtier.kvstore.tiers.redis import RedisTier

    return RedisTier(request.getfixturevalue("redis_url"), codec=codec)


TIER_KINDS = ["host", "disk", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.mark.parametrize("kind", TIER_KINDS)
@pytest.mark.parametrize("name", CODECS)
def test_tiers_round_trip_lossy_codecs_within_the_bound(kind, name, tmp_path, request):
    tier = make(kind, name, tmp_path, request)
    codec = get_codec(name)
    ks, bs = keys(3), blocks(3)
    sizes = tier.put(ks, bs, spec=SPEC)
    expected = codec_bits_per_payload = memoryview(codec.encode(bs[0], SPEC)[0]).nbytes
    assert all(s >= expected if kind != "host" else s > 0 for s in sizes)  # frames add a header
    assert codec_bits_per_payload < SPEC.block_nbytes
    got = tier.get(ks, spec=SPEC)
    assert all(within_bound(codec, g, b) for g, b in zip(got, bs))
    out = [torch.empty(SPEC.block_shape, dtype=torch.float16) for _ in ks]
    got = tier.get(ks, spec=SPEC, out=out)
    assert all(g is o for g, o in zip(got, out)) and all(within_bound(codec, o, b) for o, b in zip(out, bs))
    s = tier.stats()
    assert (s.hits, s.misses, s.corrupt) == (6, 0, 0)
    tier.close()


def _bad_frame(key, name):
    """A frame with a valid checksum whose payload its codec rejects (one byte short)."""
    payload, meta = get_codec(name).encode(blocks(1, seed=9)[0], SPEC)
    return encode_frame(key, SPEC, name, meta, SPEC.block_shape, SPEC.dtype, bytes(memoryview(payload).cast("B"))[:-1])


@pytest.mark.parametrize("name", ["kivi4", "kivi2+zstd", "fp8"])
def test_disk_frame_with_a_rejected_payload_is_a_counted_miss(name, tmp_path):
    tier = DiskTier(tmp_path, 1 << 22, codec=name)
    ks, bs = keys(2), blocks(2)
    tier.put(ks, bs, spec=SPEC)
    path = tmp_path / SPEC.short_fingerprint / ks[1].hex()[:2] / (ks[1].hex() + ".kvf")
    path.write_bytes(_bad_frame(ks[1], name))
    got = tier.get(ks, spec=SPEC)
    assert got[1] is None and got[0] is not None
    assert tier.stats().corrupt == 1 and not path.exists()


@pytest.mark.redis
@pytest.mark.parametrize("damage", ["rejected-payload", "unknown-codec", "flipped"])
def test_redis_frame_with_a_bad_lossy_payload_is_a_counted_miss(damage, redis_url, redis_server):
    from kvtier.kvstore.tiers.redis import RedisTier

    tier = RedisTier(redis_url, codec="kivi4+zstd")
    ks, bs = keys(2, seed=3), blocks(2)
    tier.put(ks, bs, spec=SPEC)
    client, victim = redis_server.client(), tier.redis_key(ks[1], SPEC)
    if damage == "rejected-payload":
        client.set(victim, _bad_frame(ks[1], "kivi4+zstd"))
    elif damage == "unknown-codec":
        payload, meta = get_codec("kivi4").encode(bs[1], SPEC)
        client.set(victim, encode_frame(ks[1], SPEC, "kivi3", meta, SPEC.block_shape, SPEC.dtype, payload))
    else:
        good = client.get(victim)
        client.set(victim, good[:-10] + bytes([good[-10] ^ 1]) + good[-9:])
    got = tier.get(ks, spec=SPEC)
    assert got[1] is None and got[0] is not None
    assert tier.stats().corrupt == 1 and client.exists(victim) == 0
    tier.close()


def test_a_tier_reads_frames_written_with_another_kivi_configuration(tmp_path):
    """Frames name the registered codec and carry the options: a tier configured with
    ``KiviCodec(4, group_size=64, residual_tokens=8)`` writes frames any kivi tier reads."""
    writer = DiskTier(tmp_path, 1 << 22, codec=KiviCodec(4, group_size=64, residual_tokens=8))
    ks, bs = keys(2), blocks(2)
    writer.put(ks, bs, spec=SPEC)
    writer.close()
    reader = DiskTier(tmp_path, 1 << 22, codec="kivi2h+zstd")
    got = reader.get(ks, spec=SPEC)
    codec = KiviCodec(4, group_size=64, residual_tokens=8)
    assert all(within_bound(codec, g, b) for g, b in zip(got, bs))
    assert all(torch.equal(g[:, :, :, -8:], b[:, :, :, -8:]) for g, b in zip(got, bs))


def test_host_tier_payload_its_codec_rejects_is_a_miss():
    tier = HostTier(1 << 22, codec="int8")
    ks, bs = keys(1), blocks(1)
    tier.put(ks, bs, spec=SPEC)
    buf, meta, n = tier._entries[bytes(ks[0])]
    buf[0:2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # an infinite float16 scale
    assert tier.get(ks, spec=SPEC) == [None]
    assert tier.stats().corrupt == 1


def test_store_with_a_codec_per_tier(tmp_path):
    """host: identity (exact), disk: kivi4+zstd. A block demoted to disk comes back within
    kivi4's bound; a block still on the host comes back exact."""
    spec = SPEC
    host = HostTier(2 * spec.block_nbytes, codec="identity")
    disk = DiskTier(tmp_path, 1 << 24, codec="kivi4+zstd")
    store = TieredStore([TierConfig(host, high_watermark=1.0, low_watermark=0.5), TierConfig(disk)], promote_on_hit=False)
    ks, bs = keys(4, seed=5), blocks(4, seed=5)
    store.put(spec, ks, bs)
    got = store.get(spec, ks)
    codec = get_codec("kivi4")
    assert all(g is not None for g in got)
    exact = [torch.equal(g, b) for g, b in zip(got, bs)]
    assert any(exact) and not all(exact)  # some blocks were demoted to the kivi4 tier
    assert all(within_bound(codec, g, b) for g, b in zip(got, bs))
    assert disk.stats().puts >= 2
    store.close()


# -- first-block sinks: the store tells a tier which blocks are a sequence's first ----------------
def test_kivi4s_keeps_the_first_blocks_sinks_exact_through_the_store(tmp_path):
    from kvtier.kvstore import DiskTier, HostTier, KVSpec, Namespace, TieredStore, chain_hashes
    from kvtier.kvstore.codecs import codec_for_block, get_codec

    spec = KVSpec("sinks", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=64)
    codec = get_codec("kivi4s")
    assert codec_for_block(codec, False) is codec and codec_for_block(codec, True).sink_tokens == 4
    zs = get_codec("kivi4s+zstd")
    assert codec_for_block(zs, True).inner.sink_tokens == 4 and codec_for_block(zs, True).name == "kivi4s+zstd"
    assert codec_for_block(get_codec("int8"), True).name == "int8"
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn(3, *spec.block_shape, generator=g).to(torch.float16)
    keys = chain_hashes(spec, torch.arange(3 * 64), Namespace(salt="s"))
    for tier in (HostTier(1 << 24, codec=get_codec("kivi4s")), DiskTier(tmp_path, 1 << 24, codec=get_codec("kivi4s+zstd"))):
        store = TieredStore([tier])
        assert store.put(spec, keys, blocks) == [True] * 3
        got = store.get(spec, keys)
        # the first block's first 4 tokens come back bit-exact; the other blocks' first tokens are quantized
        assert torch.equal(got[0][..., :4, :], blocks[0][..., :4, :])
        assert not torch.equal(got[1][..., :4, :], blocks[1][..., :4, :])
        for b in range(3):  # and everything within kivi4's bound
            assert float((got[b].float() - blocks[b].float()).abs().max()) < 0.5
        store.close()
    # a chain continued from a known parent: its first block is not the sequence's first
    store = TieredStore([HostTier(1 << 24, codec=get_codec("kivi4s"))])
    store.put(spec, keys[:1], blocks[:1])
    store.put(spec, keys[1:], blocks[1:], parent=keys[0])
    got = store.get(spec, keys[1:2])
    assert not torch.equal(got[0][..., :4, :], blocks[1][..., :4, :])
    store.close()
