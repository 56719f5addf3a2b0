"""Triton kernels for the int8 and KIVI codecs (CUDA tensors), paired with their torch paths.

Each kernel does exactly the float32 operations of the torch function of the same signature
(``int8.quantize_torch``/``dequantize_torch``, ``kivi.quantize_torch``/``dequantize_torch``), so
the payloads are the same bytes: divisions are IEEE round-to-nearest (``tl.div_rn``), the launch
disables fp contraction (no fused multiply-add where torch rounds twice), float16 conversions
round to nearest even. ``TOLERANCES`` below says how far the two may differ; the tests hold them
to it under ``TRITON_INTERPRET=1`` (set before this module is imported) on the CPU.

Tiling. int8: one program per ``BLOCK_T`` tokens of one (layer, K/V, head) row, all ``D``
channels at once. KIVI: a tile ``[BLOCK_T, BLOCK_C]`` of one (layer, head); keys reduce over the
tile's tokens (one token group per tile, ``BLOCK_C`` channels), values over its channels (one
channel group per tile, ``BLOCK_T`` tokens). Codes are packed along the channels, ``8 // BITS``
to a byte, lowest bits first; a group size that is a multiple of 4 keeps every byte in one group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# How far the Triton path may be from the torch path: codes (quantized integers) may differ by
# this many steps, decoded values by this many float32 ulps of the result before the rounding to
# the block dtype. Both are 0: the kernels do the same IEEE operations in the same order.
TOLERANCES = {"code_steps": 0, "decode_ulps": 0}

_MAX_TILE = 8192  # elements of one tile (registers per program stay bounded for any group size)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


# -- int8: symmetric, per token ---------------------------------------------------------------------
@triton.jit
def _int8_quantize_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    T,
    D,
    sxn,
    sxt,
    sxd,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = (t[:, None] < T) & (d[None, :] < D)
    x = tl.load(x_ptr + n * sxn + t[:, None] * sxt + d[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # [BLOCK_T]
    s16 = tl.div_rn(amax, 127.0).to(tl.float16)
    sf = s16.to(tl.float32)[:, None]
    safe = tl.where(sf > 0, sf, 1.0)
    y = tl.where(sf > 0, tl.div_rn(x, safe), 0.0)
    y = tl.minimum(tl.maximum(tl.floor(y + 0.5), -127.0), 127.0)
    tl.store(codes_ptr + (n * T + t[:, None]) * D + d[None, :], y.to(tl.int8), mask=mask)
    tl.store(scale_ptr + n * T + t, s16, mask=t < T)


@triton.jit
def _int8_dequantize_kernel(
    codes_ptr,
    scale_ptr,
    out_ptr,
    T,
    D,
    son,
    sot,
    sod,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (t[:, None] < T) & (d[None, :] < D)
    q = tl.load(codes_ptr + (n * T + t[:, None]) * D + d[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(scale_ptr + n * T + t, mask=t < T, other=0.0).to(tl.float32)
    x = q * s[:, None]
    tl.store(out_ptr + n * son + t[:, None] * sot + d[None, :] * sod, x.to(out_ptr.dtype.element_ty), mask=mask)


def _int8_grid(N: int, T: int, D: int):
    block_d = _pow2(D)
    block_t = max(1, min(_pow2(T), _MAX_TILE // block_d))
    return (N, triton.cdiv(T, block_t)), block_t, block_d


def int8_quantize(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Same contract as ``int8.quantize_torch``: ``x`` ``[N, T, D]`` (float, any strides) ->
    ``codes`` ``[N, T, D]`` int8 and ``scale`` ``[N, T]`` float16 (both contiguous)."""
    N, T, D = x.shape
    _check(codes, (N, T, D), torch.int8, x.device, "codes")
    _check(scale, (N, T), torch.float16, x.device, "scale")
    if x.numel() == 0:
        return
    grid, block_t, block_d = _int8_grid(N, T, D)
    _int8_quantize_kernel[grid](x, codes, scale, T, D, *x.stride(), BLOCK_T=block_t, BLOCK_D=block_d, **_LAUNCH)


def int8_dequantize(codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """Same contract as ``int8.dequantize_torch``: ``out`` ``[N, T, D]`` = ``codes·scale``."""
    N, T, D = out.shape
    _check(codes, (N, T, D), torch.int8, out.device, "codes")
    _check(scale, (N, T), torch.float16, out.device, "scale")
    if out.numel() == 0:
        return
    grid, block_t, block_d = _int8_grid(N, T, D)
    _int8_dequantize_kernel[grid](codes, scale, out, T, D, *out.stride(), BLOCK_T=block_t, BLOCK_D=block_d, **_LAUNCH)


# -- KIVI: asymmetric, grouped along tokens (keys) or channels (values), packed ----------------------
@triton.jit
def _kivi_quantize_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    H,
    T,
    D,
    NUM_BYTES,
    NUM_GROUPS,
    sxl,
    sxh,
    sxt,
    sxd,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    lh = tl.program_id(0)  # one (layer, head)
    ti = tl.program_id(1)
    ci = tl.program_id(2)
    if TOKENS:  # keys: this tile is one token group x BLOCK_C channels
        r = tl.arange(0, BLOCK_T)
        t = ti * GROUP + r
        c = ci * BLOCK_C + tl.arange(0, BLOCK_C)
        tmask = (r < GROUP) & (t < T)
        cmask = c < D
    else:  # values: BLOCK_T tokens x one channel group
        r = tl.arange(0, BLOCK_C)
        t = ti * BLOCK_T + tl.arange(0, BLOCK_T)
        c = ci * GROUP + r
        tmask = t < T
        cmask = (r < GROUP) & (c < D)
    mask = tmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + (lh // H) * sxl + (lh % H) * sxh + t[:, None] * sxt + c[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    if TOKENS:
        mn = tl.min(tl.where(mask, x, float("inf")), axis=0)[None, :]  # [1, BLOCK_C]
        mx = tl.max(tl.where(mask, x, float("-inf")), axis=0)[None, :]
    else:
        mn = tl.min(tl.where(mask, x, float("inf")), axis=1)[:, None]  # [BLOCK_T, 1]
        mx = tl.max(tl.where(mask, x, float("-inf")), axis=1)[:, None]
    z16 = mn.to(tl.float16)
    zf = z16.to(tl.float32)
    s16 = tl.div_rn(mx - zf, QMAX * 1.0).to(tl.float16)
    sf = s16.to(tl.float32)
    safe = tl.where(sf > 0, sf, 1.0)
    y = tl.where(sf > 0, tl.div_rn(x - zf, safe), 0.0)
    y = tl.minimum(tl.maximum(tl.floor(y + 0.5), 0.0), QMAX * 1.0)
    q = tl.where(mask, y, 0.0).to(tl.uint8)  # padding channels pack as zero codes
    # pack PER_BYTE neighbouring channels into one byte, lowest bits first
    shifts = (tl.arange(0, PER_BYTE) * BITS).to(tl.uint8)
    q3 = tl.reshape(q, (BLOCK_T, BLOCK_C // PER_BYTE, PER_BYTE)) << shifts[None, None, :]
    packed = tl.sum(q3.to(tl.int32), axis=2).to(tl.uint8)  # [BLOCK_T, BLOCK_C // PER_BYTE]
    if TOKENS:
        j = ci * (BLOCK_C // PER_BYTE) + tl.arange(0, BLOCK_C // PER_BYTE)
        jmask = j < NUM_BYTES
    else:
        jr = tl.arange(0, BLOCK_C // PER_BYTE)
        j = ci * (GROUP // PER_BYTE) + jr
        jmask = (jr < GROUP // PER_BYTE) & (j < NUM_BYTES)
    tl.store(codes_ptr + (lh * T + t[:, None]) * NUM_BYTES + j[None, :], packed, mask=tmask[:, None] & jmask[None, :])
    if TOKENS:  # stats [L*H, NUM_GROUPS, D]
        soff = (lh * NUM_GROUPS + ti) * D + c[None, :]
        smask = cmask[None, :]
    else:  # stats [L*H, T, NUM_GROUPS]
        soff = (lh * T + t[:, None]) * NUM_GROUPS + ci
        smask = tmask[:, None]
    tl.store(scale_ptr + soff, s16, mask=smask)
    tl.store(zero_ptr + soff, z16, mask=smask)


@triton.jit
def _kivi_dequantize_kernel(
    codes_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    H,
    T,
    D,
    NUM_BYTES,
    NUM_GROUPS,
    sol,
    soh,
    sot,
    sod,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    lh = tl.program_id(0)
    ti = tl.program_id(1)
    ci = tl.program_id(2)
    if TOKENS:
        r = tl.arange(0, BLOCK_T)
        t = ti * GROUP + r
        c = ci * BLOCK_C + tl.arange(0, BLOCK_C)
        tmask = (r < GROUP) & (t < T)
        cmask = c < D
        j = ci * (BLOCK_C // PER_BYTE) + tl.arange(0, BLOCK_C // PER_BYTE)
        jmask = j < NUM_BYTES
    else:
        r = tl.arange(0, BLOCK_C)
        t = ti * BLOCK_T + tl.arange(0, BLOCK_T)
        c = ci * GROUP + r
        tmask = t < T
        cmask = (r < GROUP) & (c < D)
        jr = tl.arange(0, BLOCK_C // PER_BYTE)
        j = ci * (GROUP // PER_BYTE) + jr
        jmask = (jr < GROUP // PER_BYTE) & (j < NUM_BYTES)
    packed = tl.load(codes_ptr + (lh * T + t[:, None]) * NUM_BYTES + j[None, :], mask=tmask[:, None] & jmask[None, :], other=0)
    shifts = (tl.arange(0, PER_BYTE) * BITS).to(tl.uint8)
    q3 = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    q = tl.reshape(q3, (BLOCK_T, BLOCK_C)).to(tl.float32)
    if TOKENS:
        soff = (lh * NUM_GROUPS + ti) * D + c[None, :]
        smask = cmask[None, :]
    else:
        soff = (lh * T + t[:, None]) * NUM_GROUPS + ci
        smask = tmask[:, None]
    s = tl.load(scale_ptr + soff, mask=smask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + soff, mask=smask, other=0.0).to(tl.float32)
    x = q * s + z
    mask = tmask[:, None] & cmask[None, :]
    tl.store(out_ptr + (lh // H) * sol + (lh % H) * soh + t[:, None] * sot + c[None, :] * sod, x.to(out_ptr.dtype.element_ty), mask=mask)


def _kivi_tiles(T: int, D: int, group: int, axis: str):
    """``(grid dims 1 and 2, BLOCK_T, BLOCK_C)`` for one (layer, head) of ``[T, D]``."""
    if axis == "tokens":
        block_t = _pow2(group)
        block_c = max(8, min(_pow2(D), _pow2(_MAX_TILE // block_t)))
        return (triton.cdiv(T, group), triton.cdiv(D, block_c)), block_t, block_c
    block_c = max(8, _pow2(group))
    block_t = max(1, min(_pow2(T), _MAX_TILE // block_c))
    return (triton.cdiv(T, block_t), triton.cdiv(D, group)), block_t, block_c


def kivi_quantize(x: torch.Tensor, bits: int, group: int, axis: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Same contract as ``kivi.quantize_torch``: ``x`` ``[L, H, T, D]`` (float, any strides) -> packed ``codes`` ``[L, H, T, ceil(D·bits/8)]`` uint8, ``scale``/``zero`` float16
    ``[L, H, ceil(T/G), D]`` (keys, ``axis="tokens"``) or ``[L, H, T, ceil(D/G)]`` (values)."""
    from .kivi import stats_shape

    L, H, T, D = x.shape
    nbytes = -(-D * bits // 8)
    _check(codes, (L, H, T, nbytes), torch.uint8, x.device, "codes")
    for name, t in (("scale", scale), ("zero", zero)):
        _check(t, stats_shape((L, H, T, D), group, axis), torch.float16, x.device, name)
    if x.numel() == 0:
        return
    (g1, g2), block_t, block_c = _kivi_tiles(T, D, group, axis)
    num_groups = scale.shape[2] if axis == "tokens" else scale.shape[3]
    _kivi_quantize_kernel[(L * H, g1, g2)](
        x,
        codes,
        scale,
        zero,
        H,
        T,
        D,
        nbytes,
        num_groups,
        *x.stride(),
        GROUP=group,
        BITS=bits,
        TOKENS=axis == "tokens",
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        **_LAUNCH,
    )


def kivi_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, axis: str, out: torch.Tensor
) -> None:
    """Same contract as ``kivi.dequantize_torch`` (without the rotation): ``out`` ``[L, H, T, D]``
    gets ``code·scale + zero`` computed in float32."""
    from .kivi import stats_shape

    L, H, T, D = out.shape
    nbytes = -(-D * bits // 8)
    _check(codes, (L, H, T, nbytes), torch.uint8, out.device, "codes")
    for name, t in (("scale", scale), ("zero", zero)):
        _check(t, stats_shape((L, H, T, D), group, axis), torch.float16, out.device, name)
    if out.numel() == 0:
        return
    (g1, g2), block_t, block_c = _kivi_tiles(T, D, group, axis)
    num_groups = scale.shape[2] if axis == "tokens" else scale.shape[3]
    _kivi_dequantize_kernel[(L * H, g1, g2)](
        codes,
        scale,
        zero,
        out,
        H,
        T,
        D,
        nbytes,
        num_groups,
        *out.stride(),
        GROUP=group,
        BITS=bits,
        TOKENS=axis == "tokens",
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        **_LAUNCH,
    )


# -- launch options and checks ----------------------------------------------------------------------
# torch rounds ``q·s`` and then ``+ z``: no fused multiply-add in the compiled kernels either.
_LAUNCH: dict = {"enable_fp_fusion": False}


def _check(t: torch.Tensor, shape, dtype: torch.dtype, device, name: str) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or not t.is_contiguous() or t.device != device:
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of shape {list(shape)} on {device}, got {t.dtype} {list(t.shape)} on {t.device}"
        )
