import hashlib

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.kvstore import FrameError, KVSpec, Namespace, chain_hashes, decode_frame, encode_frame, root_hash
from kvtier.kvstore.codecs import get_codec
from kvtier.kvstore.keys import parse_hash

SPEC = KVSpec("m", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16)


# -- KVSpec ---------------------------------------------------------------------------------
def test_spec_validation_and_layout():
    assert SPEC.block_shape == (2, 2, 2, 16, 16)
    assert SPEC.block_nbytes == 2 * 2 * 2 * 16 * 16 * 2
    assert KVSpec("m", 2, 2, 16, "fp16", 16) == SPEC  # aliases are canonicalised
    for bad in [dict(num_layers=0), dict(head_dim=-1), dict(block_tokens=24), dict(dtype="int4"), dict(model_id="")]:
        kw = dict(model_id="m", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=16) | bad
        with pytest.raises(ValueError):
            KVSpec(**kw)


def test_spec_fingerprint_is_stable_and_distinct():
    # a fixed value: fingerprints must never change across releases (they are in every key)
    assert SPEC.fingerprint == hashlib.sha256(b"kvspec/v1|m|2|2|16|float16|16").digest()
    assert len({KVSpec("m", 2, 2, 16, d, 16).fingerprint for d in ("float16", "bfloat16", "float32")}) == 3
    assert KVSpec("m", 2, 2, 16, "float16", 32).fingerprint != SPEC.fingerprint
    assert KVSpec.from_dict(SPEC.to_dict()) == SPEC
    with pytest.raises(ValueError):
        KVSpec.from_dict({**SPEC.to_dict(), "extra": 1})


# -- keys -----------------------------------------------------------------------------------
def test_chain_matches_the_documented_formula():
    tokens = np.arange(40, dtype=np.int64)
    keys = chain_hashes(SPEC, tokens)
    assert len(keys) == 2  # the trailing partial block gets no key
    h = hashlib.sha256(b"kvtier/v1" + SPEC.fingerprint + Namespace().to_bytes()).digest()
    assert root_hash(SPEC) == h
    for i in range(2):
        h = hashlib.sha256(h + tokens[i * 16 : (i + 1) * 16].astype("<u4").tobytes()).digest()
        assert keys[i] == h


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=80), st.integers(0, 80))
def test_chain_prefix_property(tokens, cut):
    """Keys of a prefix are a prefix of the keys; continuing a chain from a parent gives the same keys."""
    full = chain_hashes(SPEC, tokens)
    cut = min(cut, len(tokens)) // 16 * 16
    assert chain_hashes(SPEC, tokens[:cut]) == full[: cut // 16]
    if cut:
        tail = chain_hashes(SPEC, tokens[cut:], parent=full[cut // 16 - 1])
        assert full[: cut // 16] + tail == full


def test_namespace_and_spec_separate_chains():
    tokens = list(range(32))
    base = chain_hashes(SPEC, tokens)
    assert chain_hashes(SPEC, tokens, Namespace(tenant="a")) != base
    assert chain_hashes(SPEC, tokens, Namespace(tenant="a")) != chain_hashes(SPEC, tokens, Namespace(tenant="b"))
    assert chain_hashes(SPEC, tokens, Namespace(extra_keys=("lora:1",))) != base
    # length-prefixed: moving a character between fields changes the namespace
    assert Namespace(tenant="ab", salt="").to_bytes() != Namespace(tenant="a", salt="b").to_bytes()
    assert chain_hashes(KVSpec("other", 2, 2, 16, "float16", 16), tokens) != base


def test_chain_rejects_bad_tokens():
    for bad in ([-1] * 16, [2**32] * 16, np.zeros((2, 16), dtype=np.int64), [0.5] * 16):
        with pytest.raises(ValueError):
            chain_hashes(SPEC, bad)
    with pytest.raises(ValueError):
        parse_hash("zz")
    assert parse_hash("ab" * 32) == bytes.fromhex("ab" * 32)


def test_hashing_a_million_tokens_is_vectorised():
    spec = KVSpec("m", 1, 1, 16, "float16", 256)
    keys = chain_hashes(spec, np.arange(1 << 20, dtype=np.uint32) % 50000)
    assert len(keys) == 4096 and len(set(keys)) == 4096


# -- frames ---------------------------------------------------------------------------------
def _block(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.block_shape, generator=g).to(torch.float16)


def _frame(block, key=b"k" * 32, spec=SPEC):
    payload, meta = get_codec("identity").encode(block, spec)
    return encode_frame(key, spec, "identity", meta, spec.block_shape, spec.dtype, payload)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["float16", "bfloat16", "float32"]))
def test_frame_round_trip(seed, dtype):
    spec = KVSpec("m", 2, 2, 16, dtype, 16)
    block = torch.randn(spec.block_shape, generator=torch.Generator().manual_seed(seed)).to(spec.torch_dtype)
    buf = _frame(block, spec=spec)
    frame = decode_frame(buf, expect_key=b"k" * 32, expect_spec=spec)
    got = get_codec(frame.codec).decode(frame.data, frame.codec_meta, spec)
    assert torch.equal(got, block)
    # any msgpack decoder reads a frame as an ordinary map
    as_map = msgpack.unpackb(buf)
    assert set(as_map) >= {"v", "key", "spec", "codec", "codec_meta", "shape", "dtype", "checksum", "data"}


def test_frame_payload_is_not_copied():
    buf = _frame(_block())
    frame = decode_frame(buf)
    assert frame.data.obj is memoryview(buf).cast("B").obj or frame.data.nbytes == SPEC.block_nbytes


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b[:-1],  # truncated
        lambda b: b[: len(b) // 2],
        lambda b: b + b"x",  # trailing bytes
        lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:],  # one flipped payload bit
        lambda b: b"",
        lambda b: b"\x00" * 100,
        lambda b: msgpack.packb({"v": 1}),
        lambda b: msgpack.packb([1, 2, 3]),
    ],
)
def test_corrupt_frames_raise_frame_error(corrupt):
    with pytest.raises(FrameError):
        decode_frame(corrupt(_frame(_block())), expect_key=b"k" * 32, expect_spec=SPEC)


def test_wrong_key_or_spec_is_rejected():
    buf = _frame(_block())
    with pytest.raises(FrameError, match="key"):
        decode_frame(buf, expect_key=b"x" * 32)
    with pytest.raises(FrameError, match="spec"):
        decode_frame(buf, expect_spec=KVSpec("m", 2, 2, 16, "float16", 32))
