"""Every registered codec, alone and under every lossless stage, through the same checks."""

from __future__ import annotations

import msgpack
import pytest
import torch

from kvtier.kvstore import KVSpec, decode_frame, encode_frame
from kvtier.kvstore.codecs import Codec, available_codecs, codec_bits_per_element, codec_error_bound, codec_max_error, get_codec
from kvtier.kvstore.codecs.base import _STAGES

SPEC = KVSpec("codec-contract", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=32)
NAMES = [*available_codecs(), *(f"{c}+{s}" for c in available_codecs() for s in sorted(_STAGES))]


def block(seed=0, spec=SPEC):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.block_shape, generator=g)
    x[:, 0, :, :, 3] = x[:, 0, :, :, 3] * 20 + 5  # an outlier key channel
    return x.to(spec.torch_dtype)


@pytest.fixture(params=NAMES)
def codec(request) -> Codec:
    return get_codec(request.param)


def test_is_a_codec_with_a_name_and_a_bound(codec):
    assert isinstance(codec, Codec)
    assert get_codec(codec.name).name == codec.name  # the frame's codec name finds it again
    bound = codec_error_bound(codec)
    assert (bound.rel, bound.span, bound.abs) == (0, 0, 0) if codec.lossless else bound.span > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_within_its_declared_bound(codec, dtype):
    spec = KVSpec("codec-contract", 2, 2, 16, dtype, 32)
    b = block(1, spec)
    payload, meta = codec.encode(b, spec)
    got = codec.decode(payload, meta, spec)
    assert got.shape == b.shape and got.dtype == b.dtype
    err = (got.float() - b.float()).abs()
    assert bool((err <= codec_max_error(codec, b, spec)).all())
    if codec.lossless:
        assert torch.equal(got, b)


def test_payload_size_is_at_most_its_declared_bits(codec):
    payload, _ = codec.encode(block(2), SPEC)
    declared = codec_bits_per_element(codec, SPEC) * SPEC.block_numel / 8
    size = memoryview(payload).nbytes
    assert size <= declared if "+" in codec.name else size == declared


def test_encode_is_deterministic_and_leaves_the_block_alone(codec):
    b = block(3)
    before = b.clone()
    p1, m1 = codec.encode(b, SPEC)
    p1 = bytes(memoryview(p1).cast("B"))
    p2, m2 = codec.encode(b, SPEC)
    assert p1 == bytes(memoryview(p2).cast("B")) and m1 == m2
    assert torch.equal(b, before)


def test_decode_into_out_and_from_read_only_bytes(codec):
    b = block(4)
    payload, meta = codec.encode(b, SPEC)
    frozen = bytes(memoryview(payload).cast("B"))  # what a tier hands back: immutable bytes
    want = codec.decode(frozen, meta, SPEC)
    out = torch.empty(SPEC.block_shape, dtype=torch.float16)
    assert codec.decode(frozen, meta, SPEC, out=out) is out and torch.equal(out, want)


def test_travels_in_a_frame(codec):
    b = block(5)
    payload, meta = codec.encode(b, SPEC)
    key = bytes(range(32))
    frame = decode_frame(encode_frame(key, SPEC, codec.name, meta, SPEC.block_shape, SPEC.dtype, payload), expect_key=key, expect_spec=SPEC)
    assert frame.codec == codec.name and msgpack.unpackb(msgpack.packb(meta)) == frame.codec_meta
    assert torch.equal(get_codec(frame.codec).decode(frame.data, frame.codec_meta, SPEC), codec.decode(payload, meta, SPEC))


def test_bad_input_is_a_value_error(codec):
    b = block(6)
    with pytest.raises(ValueError):
        codec.encode(b.float(), SPEC)
    with pytest.raises(ValueError):
        codec.encode(b[:1], SPEC)
    payload, meta = codec.encode(b, SPEC)
    raw = bytes(memoryview(payload).cast("B"))
    for bad in (raw[:-1], raw + b"\0", b""):
        with pytest.raises(ValueError):
            codec.decode(bad, meta, SPEC)
    with pytest.raises(ValueError):
        codec.decode(raw, {"not": "its meta"}, SPEC)
    with pytest.raises(ValueError):
        codec.decode(raw, meta, SPEC, out=torch.empty(3))
