"""The Triton quantize/dequantize kernels against the torch paths of the codecs.

On a machine without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py before anything imports triton) on CPU tensors, at small shapes, with float16
and float32 inputs. ``TOLERANCES`` (next to the kernels) says how far apart the two may be: the
kernels do the same IEEE float32 operations, so codes, scales and decoded values are identical.
"""

from __future__ import annotations

import pytest
import torch

from kvtier.kvstore import KVSpec
from kvtier.kvstore.codecs import get_codec, int8, kivi, quant
from kvtier.kvstore.codecs import triton_quant as tq

DTYPES = [torch.float16, torch.float32]
# the kernels run on CUDA tensors where there is a GPU, else on CPU tensors in the interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (L, H, T, D): powers of two, a head_dim that is not one, a token count off the group size
SHAPES = [(2, 2, 16, 16), (1, 2, 20, 12), (1, 1, 33, 64)]


def kv(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, H, T, D = shape
    x = torch.randn(L, 2, H, T, D, generator=g) * 3
    x[:, 0, :, :, 1] += 40  # an outlier key channel
    x[:, 1, :, 2] = 0.5  # a constant token (zero extent)
    return x.to(dtype)


def assert_close(triton_out: torch.Tensor, torch_out: torch.Tensor, what: str) -> None:
    if triton_out.dtype in (torch.uint8, torch.int8):
        diff = (triton_out.int() - torch_out.int()).abs().max()
        assert int(diff) <= tq.TOLERANCES["code_steps"], f"{what}: codes differ by {int(diff)}"
    else:
        ulps = tq.TOLERANCES["decode_ulps"]
        tol = ulps * torch.finfo(torch.float32).eps * torch_out.float().abs()
        assert bool(((triton_out.float() - torch_out.float()).abs() <= tol).all()), f"{what}: values differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits, group", [(4, 8), (2, 12), (4, 32)])
def test_kivi_kernels_match_the_torch_path(dtype, shape, bits, group):
    L, H, T, D = shape
    block = kv(shape, dtype)
    for kv_idx, axis in ((0, "tokens"), (1, "channels")):
        x = block[:, kv_idx]  # [L, H, T, D], a strided view as the codec passes it
        ss = kivi.stats_shape((L, H, T, D), group, axis)
        want = [
            torch.empty(L, H, T, quant.packed_len(D, bits), dtype=torch.uint8),
            torch.empty(ss, dtype=torch.float16),
            torch.empty(ss, dtype=torch.float16),
        ]
        got = [t.to(DEVICE) for t in want]
        kivi.quantize_torch(x, bits, group, axis, *want)
        tq.kivi_quantize(x.to(DEVICE), bits, group, axis, *got)
        for name, a, b in zip(("codes", "scale", "zero"), got, want):
            assert_close(a.cpu(), b, f"kivi{bits} {axis} {name}")
        ref = torch.empty(L, H, T, D, dtype=dtype)
        kivi.dequantize_torch(*want, bits, group, axis, ref)
        out = torch.zeros(L, 2, H, T, D, dtype=dtype, device=DEVICE)[:, kv_idx]  # decode into a strided view
        tq.kivi_dequantize(*(t.to(DEVICE) for t in want), bits, group, axis, out)
        assert_close(out.cpu(), ref, f"kivi{bits} {axis} decode")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_kernels_match_the_torch_path(dtype, shape):
    L, H, T, D = shape
    x = kv(shape, dtype).reshape(L * 2 * H, T, D)
    want = [torch.empty(L * 2 * H, T, D, dtype=torch.int8), torch.empty(L * 2 * H, T, dtype=torch.float16)]
    got = [t.to(DEVICE) for t in want]
    int8.quantize_torch(x, *want)
    tq.int8_quantize(x.to(DEVICE), *got)
    assert_close(got[0].cpu(), want[0], "int8 codes")
    assert_close(got[1].cpu(), want[1], "int8 scales")
    ref, out = torch.empty_like(x), torch.empty_like(x, device=DEVICE)
    int8.dequantize_torch(*want, ref)
    tq.int8_dequantize(*(t.to(DEVICE) for t in want), out)
    assert_close(out.cpu(), ref, "int8 decode")


@pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU, test_cuda_round_trip_matches_cpu runs the kernels on CUDA tensors")
@pytest.mark.parametrize("name", ["int8", "kivi4", "kivi2h", "kivi2+zstd"])
def test_codecs_make_the_same_payload_on_either_path(name, monkeypatch):
    """The whole codec through its Triton path (as on CUDA) vs its torch path: same bytes."""
    spec = KVSpec("triton", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", block_tokens=32)
    block = kv((2, 2, 32, 16), torch.float16, seed=1)
    codec = get_codec(name)
    p_torch, meta = codec.encode(block, spec)
    d_torch = codec.decode(p_torch, meta, spec)
    monkeypatch.setattr(quant, "use_triton", lambda t: True)
    p_triton, meta_triton = codec.encode(block, spec)
    assert meta_triton == meta and bytes(memoryview(p_triton).cast("B")) == bytes(memoryview(p_torch).cast("B"))
    out = torch.empty_like(block)
    assert codec.decode(p_torch, meta, spec, out=out) is out and torch.equal(out, d_torch)


def test_launchers_check_their_buffers():
    x = torch.zeros(1, 1, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match="codes must be a contiguous torch.uint8"):
        tq.kivi_quantize(
            x,
            4,
            8,
            "tokens",
            torch.empty(1, 1, 8, 3, dtype=torch.uint8, device=DEVICE),
            torch.empty(1, 1, 1, 8, dtype=torch.float16, device=DEVICE),
            torch.empty(1, 1, 1, 8, dtype=torch.float16, device=DEVICE),
        )
    with pytest.raises(ValueError, match="scale must be"):
        tq.int8_quantize(
            torch.zeros(2, 4, 8, device=DEVICE),
            torch.empty(2, 4, 8, dtype=torch.int8, device=DEVICE),
            torch.empty(2, 4, dtype=torch.float32, device=DEVICE),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int8", "kivi4", "kivi2h"])
def test_cuda_round_trip_matches_cpu(name):
    spec = KVSpec("gpu", num_layers=4, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=64)
    block = kv((4, 2, 64, 64), torch.float16, seed=2)
    codec = get_codec(name)
    p_cpu, meta = codec.encode(block, spec)
    p_gpu, meta_gpu = codec.encode(block.cuda(), spec)
    assert meta_gpu == meta and bytes(memoryview(p_gpu).cast("B")) == bytes(memoryview(p_cpu).cast("B"))
    out = torch.empty(spec.block_shape, dtype=torch.float16, device="cuda")
    codec.decode(p_cpu, meta, spec, out=out)
    assert torch.equal(out.cpu(), codec.decode(p_cpu, meta, spec))
