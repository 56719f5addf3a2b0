"""Encryption at rest (AES-256-GCM, ``kvstore.crypto``) on the disk and Redis tiers: the stored
bytes reveal nothing of the block, and anything tampered, plaintext or moved is a miss."""

from __future__ import annotations

import os

import pytest
import torch

from kvtier.kvstore import DiskTier, KVSpec, Namespace, chain_hashes
from kvtier.kvstore.crypto import OVERHEAD, FrameCipher
from kvtier.kvstore.frames import FrameError

SPEC = KVSpec("crypt", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16)


def blocks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SPEC.block_shape, generator=g).half() for _ in range(n)]


def keys(n, salt="c"):
    return chain_hashes(SPEC, list(range(16 * n)), Namespace(salt=salt))


def test_cipher_round_trip_and_refusals():
    c = FrameCipher(os.urandom(32))
    k1, k2 = os.urandom(32), os.urandom(32)
    sealed = c.seal(k1, b"frame bytes")
    assert c.open(k1, sealed) == b"frame bytes" and len(sealed) == len(b"frame bytes") + OVERHEAD
    assert c.seal(k1, b"frame bytes") != sealed  # a fresh nonce each time
    for bad in (sealed[:-1], sealed[:20] + bytes([sealed[20] ^ 1]) + sealed[21:], b"frame bytes"):
        with pytest.raises(FrameError):
            c.open(k1, bad)
    with pytest.raises(FrameError):
        c.open(k2, sealed)  # moved under another block's key
    with pytest.raises(FrameError):
        FrameCipher(os.urandom(32)).open(k1, sealed)  # another key
    with pytest.raises(ValueError):
        FrameCipher(b"short")


def _files(root):
    return sorted(p for p in root.rglob("*.kvf"))


def test_disk_tier_encrypts_and_tampered_files_are_misses(tmp_path):
    cipher = FrameCipher(os.urandom(32))
    tier = DiskTier(tmp_path / "d", 1 << 24, cipher=cipher)
    ks, bs = keys(3), blocks(3)
    assert all(tier.put(ks, bs, spec=SPEC))
    assert all(torch.equal(g, b) for g, b in zip(tier.get(ks, spec=SPEC), bs))
    files = _files(tmp_path / "d")
    raw = bs[0].numpy().tobytes()
    for f in files:
        data = f.read_bytes()
        assert raw[:64] not in data and b"crypt" not in data  # neither the tensor nor the spec's model id is readable
    # tamper with one, move another over a third: both misses, removed, counted as corrupt
    path = {f.stem: f for f in files}
    p0, p1, p2 = (path[k.hex()] for k in ks)
    data = bytearray(p0.read_bytes())
    data[len(data) // 2] ^= 0x40
    p0.write_bytes(bytes(data))
    p2.write_bytes(p1.read_bytes())
    got = tier.get(ks, spec=SPEC)
    assert got[0] is None and got[2] is None and torch.equal(got[1], bs[1])
    assert tier.stats().corrupt == 2 and not p0.exists() and not p2.exists()
    # a plaintext frame (written without the key) is refused too
    plain = DiskTier(tmp_path / "p", 1 << 24)
    assert all(plain.put(ks[:1], bs[:1], spec=SPEC))
    enc = DiskTier(tmp_path / "p", 1 << 24, cipher=cipher)
    assert enc.get(ks[:1], spec=SPEC) == [None] and enc.stats().corrupt == 1


@pytest.mark.redis
def test_redis_tier_encrypts_and_tampered_values_are_misses(redis_url, redis_server):
    from kvtier.kvstore.tiers.redis import RedisTier

    cipher = FrameCipher(os.urandom(32))
    tier = RedisTier(redis_url, cipher=cipher)
    try:
        ks, bs = keys(3, "r"), blocks(3, seed=5)
        assert all(tier.put(ks, bs, spec=SPEC))
        assert all(torch.equal(g, b) for g, b in zip(tier.get(ks, spec=SPEC), bs))
        with redis_server.client() as r:
            values = [r.get(tier.redis_key(k, SPEC)) for k in ks]
            assert all(bs[0].numpy().tobytes()[:64] not in v and b"crypt" not in v for v in values)
            r.set(tier.redis_key(ks[2], SPEC), values[1])  # another block's sealed value
            tampered = bytearray(values[0])
            tampered[-5] ^= 1
            r.set(tier.redis_key(ks[0], SPEC), bytes(tampered))
        got = tier.get(ks, spec=SPEC)
        assert got[0] is None and got[2] is None and torch.equal(got[1], bs[1])
        assert tier.stats().corrupt == 2
        plain = RedisTier(redis_url)
        assert all(plain.put(ks[:1], bs[:1], spec=SPEC))  # a plaintext frame under the key
        assert tier.get(ks[:1], spec=SPEC) == [None]
        plain.close()
    finally:
        tier.close()
