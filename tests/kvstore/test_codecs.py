"""The lossy codecs and lossless stages: error bounds, packing, payload sizes, bad input."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.kvstore import KVSpec
from kvtier.kvstore.codecs import available_codecs, codec_bits_per_element, codec_max_error, get_codec
from kvtier.kvstore.codecs import kivi
from kvtier.kvstore.codecs.kivi import KiviCodec, hadamard
from kvtier.kvstore.codecs.lossless import ZstdStage
from kvtier.kvstore.codecs.quant import pack_bits, packed_len, unpack_bits

SPEC = KVSpec("codecs", num_layers=2, num_kv_heads=2, head_dim=32, dtype="float16", block_tokens=32)
LOSSY = ["fp8", "int8", "kivi4", "kivi2", "kivi2h", "kivi4s", "kivi2hs"]


def kv_like(spec: KVSpec, seed: int = 0, scale: float = 1.0, offset: float = 0.0, outliers: float = 0.0) -> torch.Tensor:
    """A block with the features of real KV: per-channel offsets on keys and a few outlier
    channels (keys) of ``outliers`` times the typical magnitude."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.block_shape, generator=g) * scale + offset  # [L, 2, H, T, D]
    if outliers:
        ch = torch.randint(0, spec.head_dim, (max(1, spec.head_dim // 16),), generator=g)
        x[:, 0, :, :, ch] = x[:, 0, :, :, ch] * outliers + outliers * scale
    return x.to(spec.torch_dtype)


def round_trip(codec, block, spec):
    payload, meta = codec.encode(block, spec)
    return codec.decode(payload, meta, spec)


# -- registry ---------------------------------------------------------------------------------------
def test_registry_names_every_codec_and_stage():
    assert set(available_codecs()) == {"identity", "fp8", "int8", "kivi4", "kivi2", "kivi2h", "kivi4s", "kivi2hs", "paged", "paged_int8"}
    c = get_codec("kivi4+zstd")
    assert c.name == "kivi4+zstd" and not c.lossless
    assert get_codec("identity+lz4").lossless
    assert get_codec("int8+zstd+lz4").name == "int8+zstd+lz4"


@pytest.mark.parametrize(
    "name, match", [("", "non-empty"), ("kivi3", "unknown codec"), ("kivi4+gzip", "unknown lossless stage"), ("zstd", "unknown codec")]
)
def test_unknown_names_are_value_errors(name, match):
    with pytest.raises(ValueError, match=match):
        get_codec(name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=3), "bits must be 2 or 4"),
        (dict(bits=4, group_size=30), "multiple of 4"),
        (dict(bits=4, group_size=0), "multiple of 4"),
        (dict(bits=4, key_group_size=8192), "within"),
        (dict(bits=4, value_group_size=True), "value_group_size"),
        (dict(bits=4, residual_tokens=-1), "residual_tokens"),
        (dict(bits=4, sink_tokens=-2), "sink_tokens"),
        (dict(bits=4, sink_tokens=1.5), "sink_tokens"),
        (dict(bits=4, sink_tokens=True), "sink_tokens"),
        (dict(bits=2, rotate="yes"), "rotate must be a bool"),
    ],
)
def test_kivi_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KiviCodec(**kwargs)


# -- declared sizes ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, bits",
    [
        ("identity", 16.0),
        ("fp8", 8 + 32 / (32 * 32)),  # one float32 scale per (layer, K/V, head) of T·D elements
        ("int8", 8 + 16 / 32),  # one float16 scale per token and head
        ("kivi4", 4 + 16 / 32 + 16 / 32),  # float16 scale+zero per group: 64 capped by 32 tokens (K) / 32 channels (V)
        ("kivi2", 2 + 1.0),
        ("kivi2h", 2 + 1.0),
    ],
)
def test_bits_per_element_are_exact_payload_sizes(name, bits):
    codec = get_codec(name)
    assert codec_bits_per_element(codec, SPEC) == pytest.approx(bits)
    payload, _ = codec.encode(kv_like(SPEC), SPEC)
    assert memoryview(payload).nbytes * 8 == pytest.approx(bits * SPEC.block_numel)


def test_registered_kivi_codecs_use_groups_of_64():
    """On the reference model's blocks (256 tokens, head_dim 64): 4.5 and 2.5 bits per element,
    3.56x and 6.4x smaller than float16."""
    ref = KVSpec("ref", 30, 3, 64, "float16", 256)
    for name, bits in (("kivi4", 4.5), ("kivi2", 2.5), ("kivi2h", 2.5)):
        codec = get_codec(name)
        assert (codec.key_group_size, codec.value_group_size) == (64, 64)
        assert codec_bits_per_element(codec, ref) == bits
    assert 16 / 4.5 >= 3.5 and 16 / 2.5 >= 6


def test_kivi_group_sizes_and_residual_change_the_bits():
    assert KiviCodec(4, group_size=64).bits_per_element(KVSpec("m", 1, 1, 64, "float16", 256)) == pytest.approx(4.5)
    assert KiviCodec(2, key_group_size=16, value_group_size=32).bits_per_element(SPEC) == pytest.approx(2 + 0.5 * (2 + 1))
    # a residual window of R = 8 tokens stays in float16; per (layer, head) of 2·32·32 elements:
    # residual 2·8·32·16 + key stats (one partial group of 24 tokens) 32·32 + value stats 24·32
    # + codes 2·24·32·4 bits
    r = KiviCodec(4, residual_tokens=8)
    want = (2 * 8 * 32 * 16 + 32 * 32 + 24 * 32 + 2 * 24 * 32 * 4) / (2 * 32 * 32)
    payload, _ = r.encode(kv_like(SPEC), SPEC)
    assert memoryview(payload).nbytes * 8 / SPEC.block_numel == pytest.approx(r.bits_per_element(SPEC))
    assert r.bits_per_element(SPEC) == want == 7.875


def test_sink_tokens_are_counted_in_the_bits():
    # S = 4 sink tokens in float16 at the start; per (layer, head) of 2·32·32 elements:
    # sink 2·4·32·16 + key stats (one partial group of 28 tokens) 32·32 + value stats 28·32
    # + codes 2·28·32·4 bits
    s = KiviCodec(4, sink_tokens=4)
    want = (2 * 4 * 32 * 16 + 32 * 32 + 28 * 32 + 2 * 28 * 32 * 4) / (2 * 32 * 32)
    assert s.bits_per_element(SPEC) == pytest.approx(want) == 6.4375
    payload, meta = s.encode(kv_like(SPEC), SPEC)
    assert memoryview(payload).nbytes * 8 == want * SPEC.block_numel and meta["sink"] == 4
    # sink and residual together: every token exact costs the block dtype and nothing else
    both = KiviCodec(4, sink_tokens=20, residual_tokens=12)
    assert both.bits_per_element(SPEC) == 16.0
    # on the reference model's blocks (256 tokens, head_dim 64), a first block with 4 sinks
    ref = KVSpec("ref", 30, 3, 64, "float16", 256)
    assert KiviCodec(4, group_size=64, sink_tokens=4).bits_per_element(ref) == pytest.approx(
        (2 * 4 * 64 * 16 + 4 * 64 * 32 + 252 * 32 + 2 * 252 * 64 * 4) / (2 * 256 * 64)
    )


@pytest.mark.parametrize("sink, residual", [(5, 0), (0, 6), (3, 7), (32, 0), (16, 16)])
@pytest.mark.parametrize("bits, rotate", [(4, False), (2, False), (2, True)])
def test_sink_and_residual_tokens_are_bit_exact(sink, residual, bits, rotate):
    """The first ``sink`` and last ``residual`` tokens come back bit for bit (K and V, every layer
    and head); the tokens between are quantized as a block of their own: the same payload as
    the quantizer gives on the middle part alone."""
    codec = KiviCodec(bits, group_size=8, sink_tokens=sink, residual_tokens=residual, rotate=rotate)
    block = kv_like(SPEC, seed=11, outliers=20.0)
    payload, meta = codec.encode(block, SPEC)
    assert (meta["sink"], meta["residual"]) == (sink, residual)
    got = codec.decode(payload, meta, SPEC)
    T = SPEC.block_tokens
    assert torch.equal(got[:, :, :, :sink], block[:, :, :, :sink])
    assert torch.equal(got[:, :, :, T - residual :], block[:, :, :, T - residual :])
    err = (got.float() - block.float()).abs()
    assert bool((err <= codec_max_error(codec, block, SPEC)).all())
    bound = codec_max_error(codec, block, SPEC)
    assert not bound[:, :, :, :sink].any() and not bound[:, :, :, T - residual :].any()  # declared exact
    middle = T - sink - residual
    if middle:
        assert not torch.equal(got[:, :, :, sink : T - residual], block[:, :, :, sink : T - residual])
        if not rotate:  # groups start at the first quantized token
            for kv, axis in ((0, "tokens"), (1, "channels")):
                x = block[:, kv, :, sink : T - residual]  # [L, H, middle, D]
                ss = kivi.stats_shape(tuple(x.shape), 8, axis)
                parts = [
                    torch.empty(*x.shape[:3], packed_len(x.shape[3], bits), dtype=torch.uint8),
                    torch.empty(ss, dtype=torch.float16),
                    torch.empty(ss, dtype=torch.float16),
                ]
                kivi.quantize_torch(x, bits, 8, axis, *parts)
                want = torch.empty_like(x)
                kivi.dequantize_torch(*parts, bits, 8, axis, want)
                assert torch.equal(got[:, kv, :, sink : T - residual], want)
    # any kivi codec decodes it, into a caller's buffer too
    out = torch.empty_like(block)
    assert torch.equal(get_codec("kivi4").decode(payload, meta, SPEC, out=out), got)


def test_sink_and_residual_must_fit_the_block():
    with pytest.raises(ValueError, match="sink_tokens \\+ residual_tokens"):
        KiviCodec(4, sink_tokens=20, residual_tokens=13).encode(kv_like(SPEC), SPEC)
    with pytest.raises(ValueError, match="sink_tokens \\+ residual_tokens"):
        KiviCodec(4, sink_tokens=33).bits_per_element(SPEC)
    payload, meta = KiviCodec(4, sink_tokens=4).encode(kv_like(SPEC), SPEC)
    for bad in (
        {**meta, "sink": 40},
        {**meta, "sink": -1},
        {**meta, "sink": 30, "residual": 3},
        {k: v for k, v in meta.items() if k != "sink"},
    ):
        with pytest.raises(ValueError):
            get_codec("kivi4").decode(payload, bad, SPEC)


def test_replace_changes_options_and_keeps_the_name():
    c = KiviCodec(2, group_size=16, rotate=True, name="kivi2h")
    s = c.replace(sink_tokens=4, residual_tokens=8)
    assert (s.bits, s.key_group_size, s.value_group_size, s.rotate, s.name) == (2, 16, 16, True, "kivi2h")
    assert (s.sink_tokens, s.residual_tokens) == (4, 8) and (c.sink_tokens, c.residual_tokens) == (0, 0)
    with pytest.raises(ValueError, match="no option"):
        c.replace(sinks=4)
    with pytest.raises(ValueError, match="sink_tokens"):
        c.replace(sink_tokens=-1)


# -- error bounds (the bound is the codec's own, declared in one place) ------------------------------
CODEC_CASES = {
    "fp8": lambda: get_codec("fp8"),
    "int8": lambda: get_codec("int8"),
    "kivi4": lambda: get_codec("kivi4"),
    "kivi2": lambda: get_codec("kivi2"),
    "kivi2h": lambda: get_codec("kivi2h"),
    "kivi4-g12-residual": lambda: KiviCodec(4, group_size=12, residual_tokens=5),
    "kivi4-g12-sink-residual": lambda: KiviCodec(4, group_size=12, sink_tokens=3, residual_tokens=5),
    "kivi2h-sink": lambda: KiviCodec(2, rotate=True, sink_tokens=4, name="kivi2h"),
    "kivi2-k8-v20": lambda: KiviCodec(2, key_group_size=8, value_group_size=20),
    "kivi4h+zstd": lambda: ZstdStage(KiviCodec(4, rotate=True)),
    "int8+lz4": lambda: get_codec("int8+lz4"),
}


@st.composite
def blocks_and_specs(draw):
    dtype = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    spec = KVSpec(
        "prop",
        num_layers=draw(st.integers(1, 2)),
        num_kv_heads=draw(st.integers(1, 2)),
        head_dim=draw(st.sampled_from([8, 16, 32])),
        dtype=dtype,
        block_tokens=draw(st.sampled_from([16, 32, 48])),
    )
    scale = 10.0 ** draw(st.integers(-3, 2))  # with outliers and offsets: within the float16 range of the scales
    offset = draw(st.sampled_from([0.0, 1.0, -50.0])) * scale
    outliers = draw(st.sampled_from([0.0, 10.0, 100.0] if scale <= 10 else [0.0, 10.0]))
    block = kv_like(spec, seed=draw(st.integers(0, 2**16)), scale=scale, offset=offset, outliers=outliers)
    if draw(st.booleans()):  # constant stretches: zero extents, zero scales
        block[:, :, :, : spec.block_tokens // 2] = block[:, :, :, :1]
    return spec, block


@pytest.mark.parametrize("case", sorted(CODEC_CASES))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=blocks_and_specs())
def test_round_trip_is_within_the_declared_bound(case, data):
    spec, block = data
    codec = CODEC_CASES[case]()
    payload, meta = codec.encode(block, spec)
    msgpack.packb(meta)  # the meta travels in a frame
    got = codec.decode(payload, meta, spec)
    assert got.dtype == block.dtype and got.shape == block.shape
    err = (got.float() - block.float()).abs()
    allowed = codec_max_error(codec, block, spec)
    worst = (err - allowed).max()
    assert worst <= 0, f"{case}: error exceeds the declared bound by {float(worst)}"


def test_the_bound_is_tight_enough_to_mean_something():
    """The declared kivi bound is within 2x of the error actually reached on random data."""
    block = kv_like(SPEC, seed=3)
    for name in ("int8", "kivi4", "kivi2"):
        codec = get_codec(name)
        err = (round_trip(codec, block, SPEC).float() - block.float()).abs()
        allowed = codec_max_error(codec, block, SPEC)
        assert float((err / allowed).max()) > 0.5, name


def test_kivi_keys_per_channel_absorb_outlier_channels():
    """An outlier key channel costs the other channels nothing (per-channel key groups), while a
    per-token codec (int8) spends its range on it."""
    block = kv_like(SPEC, seed=1, outliers=100.0)
    ordinary = kv_like(SPEC, seed=1)
    mask = (block[:, 0] == ordinary[:, 0]).all(dim=(0, 1, 2))  # channels without an outlier, [D]
    k = block[:, 0, :, :, mask].float()
    err_kivi = (round_trip(get_codec("kivi4"), block, SPEC)[:, 0, :, :, mask].float() - k).abs().mean()
    err_int8 = (round_trip(get_codec("int8"), block, SPEC)[:, 0, :, :, mask].float() - k).abs().mean()
    assert err_kivi < err_int8


def test_residual_tokens_are_stored_exactly():
    codec = KiviCodec(2, residual_tokens=7)
    block = kv_like(SPEC, seed=2)
    got = round_trip(codec, block, SPEC)
    assert torch.equal(got[:, :, :, -7:], block[:, :, :, -7:])
    assert not torch.equal(got[:, :, :, :-7], block[:, :, :, :-7])
    # every kivi codec decodes every kivi payload: the options travel in the meta
    payload, meta = codec.encode(block, SPEC)
    assert torch.equal(get_codec("kivi4").decode(payload, meta, SPEC), got)


def test_hadamard_is_orthonormal_and_needs_a_power_of_two():
    h = hadamard(16)
    assert torch.allclose(h @ h.T, torch.eye(16), atol=1e-6) and torch.equal(h, h.T)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)
    spec = KVSpec("m", 1, 1, 24, "float16", 16)
    with pytest.raises(ValueError, match="power of two"):
        get_codec("kivi2h").encode(torch.zeros(spec.block_shape, dtype=torch.float16), spec)


# -- decode into a caller's buffer ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["identity", *LOSSY, "kivi4+zstd", "int8+lz4"])
def test_decode_into_a_caller_buffer(name):
    codec = get_codec(name)
    block = kv_like(SPEC, seed=4)
    payload, meta = codec.encode(block, SPEC)
    want = codec.decode(payload, meta, SPEC)
    out = torch.full(SPEC.block_shape, 7.0, dtype=torch.float16)
    assert codec.decode(payload, meta, SPEC, out=out) is out and torch.equal(out, want)
    # a non-contiguous destination (a block inside a larger batch) is written in place too
    big = torch.zeros((SPEC.num_layers, 2, SPEC.num_kv_heads, SPEC.block_tokens, 2 * SPEC.head_dim), dtype=torch.float16)
    view = big[..., ::2]
    assert codec.decode(payload, meta, SPEC, out=view) is view
    assert torch.equal(big[..., ::2], want) and not big[..., 1::2].any()


# -- bit packing ------------------------------------------------------------------------------------
def test_pack_layout_is_lowest_bits_first():
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_bits(codes, 2).tolist() == [[0b00111001, 0b00000011]]
    assert pack_bits(torch.tensor([[0xA, 0x5, 0xF]], dtype=torch.uint8), 4).tolist() == [[0x5A, 0x0F]]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), rows=st.integers(1, 4), n=st.integers(0, 40), seed=st.integers(0, 1000))
def test_packing_is_exact(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (rows, packed_len(n, bits)) == (rows, math.ceil(n * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_packing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(torch.zeros(1, 4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(1, 2, dtype=torch.uint8), 4, 7)


# -- lossless stages --------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["zstd", "lz4"])
@pytest.mark.parametrize("inner", ["identity", "fp8", "int8", "kivi4", "kivi2h"])
def test_lossless_stages_are_bit_exact(stage, inner):
    block = kv_like(SPEC, seed=5, outliers=10.0)
    plain, wrapped = get_codec(inner), get_codec(f"{inner}+{stage}")
    p0, m0 = plain.encode(block, SPEC)
    p1, m1 = wrapped.encode(block, SPEC)
    assert m1["inner"] == m0 and m1["n"] == memoryview(p0).nbytes
    assert memoryview(p1).nbytes <= memoryview(p0).nbytes
    assert torch.equal(wrapped.decode(p1, m1, SPEC), plain.decode(p0, m0, SPEC))


def test_zstd_levels_are_checked_and_all_decode_alike():
    block = kv_like(SPEC, seed=8)
    want = get_codec("kivi4").decode(*get_codec("kivi4").encode(block, SPEC), SPEC)
    for level in (1, 19):
        codec = ZstdStage(KiviCodec(4), level=level)
        assert torch.equal(codec.decode(*codec.encode(block, SPEC), SPEC), want)
    with pytest.raises(ValueError, match="zstd level"):
        ZstdStage(KiviCodec(4), level=23)


def test_a_stage_never_grows_an_incompressible_payload():
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (SPEC.block_nbytes,), generator=g, dtype=torch.uint8)
    noise = noise.view(torch.float16).view(SPEC.block_shape)  # random bit patterns (identity keeps NaNs)
    for stage in ("zstd", "lz4"):
        codec = get_codec(f"identity+{stage}")
        payload, meta = codec.encode(noise, SPEC)
        assert meta["packed"] is False and memoryview(payload).nbytes == SPEC.block_nbytes
        got = codec.decode(payload, meta, SPEC)
        assert torch.equal(got.view(torch.int16), noise.view(torch.int16))
    payload, meta = get_codec("identity+zstd").encode(torch.zeros(SPEC.block_shape, dtype=torch.float16), SPEC)
    assert meta["packed"] is True and memoryview(payload).nbytes < SPEC.block_nbytes // 100


# -- bad input: ValueError, with what was expected ---------------------------------------------------
@pytest.mark.parametrize("name", ["identity", *LOSSY])
def test_wrong_blocks_are_value_errors(name):
    codec = get_codec(name)
    with pytest.raises(ValueError, match="dtype must be float16"):
        codec.encode(kv_like(SPEC).float(), SPEC)
    with pytest.raises(ValueError, match="block shape must be"):
        codec.encode(kv_like(SPEC)[:, :, :, :16], SPEC)
    with pytest.raises(ValueError, match="torch.Tensor"):
        codec.encode(kv_like(SPEC).numpy(), SPEC)


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_codecs_refuse_fp8_specs_and_non_finite_blocks(name):
    spec8 = KVSpec("m", 1, 1, 16, "float8_e4m3fn", 16)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        get_codec(name).encode(torch.zeros(spec8.block_shape, dtype=torch.float8_e4m3fn), spec8)
    block = kv_like(SPEC)
    block[0, 0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        get_codec(name).encode(block, SPEC)


@pytest.mark.parametrize("name", ["int8", "kivi4", "kivi2", "kivi2h"])
def test_values_beyond_the_range_of_the_scales_are_value_errors(name):
    """int8 and kivi keep float16 scales and zero points: float32 KV beyond ~65504 does not fit.
    (fp8 keeps float32 scales: any finite block fits.)"""
    spec = KVSpec("m", 1, 1, 16, "float32", 16)
    block = torch.zeros(spec.block_shape)
    block[0, 0, 0, 0, 0] = 1e9
    block[0, 0, 0, 1, 0] = -1e9
    with pytest.raises(ValueError, match="not finite"):
        get_codec(name).encode(block, spec)


def _corruptions(name):
    """(label, payload, meta) triples that are wrong for codec ``name``."""
    codec = get_codec(name)
    payload, meta = codec.encode(kv_like(SPEC, seed=6), SPEC)
    raw = bytes(memoryview(payload).cast("B"))
    yield "truncated", raw[:-1], meta
    yield "extended", raw + b"\0", meta
    yield "empty", b"", meta
    yield "meta-not-a-dict", raw, [1, 2]
    yield "meta-extra-key", raw, {**meta, "extra": 1} if isinstance(meta, dict) else meta
    if name.startswith("kivi"):
        yield "meta-bits", raw, {**meta, "bits": 3}
        yield "meta-bits-bool", raw, {**meta, "bits": True}
        yield "meta-group", raw, {**meta, "k_group": 6}
        yield "meta-residual", raw, {**meta, "residual": SPEC.block_tokens + 1}
    if name in ("kivi4", "kivi2", "kivi2h"):
        yield "meta-sink", raw, {**meta, "sink": 1}
        yield "meta-sink-negative", raw, {**meta, "sink": -1}
        yield "meta-sink-missing", raw, {k: v for k, v in meta.items() if k != "sink"}
        yield "meta-other-layout", raw, {**meta, "v_group": 16}
    if name in ("int8", "kivi4", "kivi2"):  # float16 scales first: make one infinite
        bad = bytearray(raw)
        bad[0:2] = b"\x00\x7c"
        yield "inf-scale", bytes(bad), meta
    if name == "fp8":  # e4m3fn NaN codes (never written by encode)
        bad = bytearray(raw)
        bad[-1] = 0x7F
        yield "nan-code", bytes(bad), meta
    if name.endswith("+zstd"):  # zstd checks its content checksum
        bad = bytearray(raw)
        bad[len(bad) // 2] ^= 0xFF
        yield "flipped-compressed", bytes(bad), meta
    if "+" in name:
        yield "meta-n", raw, {**meta, "n": meta["n"] + 1}
        yield "meta-n-huge", raw, {**meta, "n": 1 << 40}


@pytest.mark.parametrize("name", ["identity", *LOSSY, "kivi4+zstd", "int8+lz4", "kivi2+zstd"])
def test_corrupt_payloads_are_value_errors(name):
    codec = get_codec(name)
    for label, payload, meta in _corruptions(name):
        if label == "flipped-compressed" and not meta["packed"]:
            continue
        with pytest.raises(ValueError):
            codec.decode(payload, meta, SPEC)
            pytest.fail(f"{name}: {label} decoded without an error")


def test_decode_checks_the_out_buffer():
    codec = get_codec("kivi4")
    payload, meta = codec.encode(kv_like(SPEC), SPEC)
    with pytest.raises(ValueError, match="dtype must be float16"):
        codec.decode(payload, meta, SPEC, out=torch.empty(SPEC.block_shape))
    with pytest.raises(ValueError, match="block shape"):
        codec.decode(payload, meta, SPEC, out=torch.empty(3, dtype=torch.float16))
