"""KIVI: asymmetric 2- and 4-bit quantization of K per channel and V per token.

Keys have outlier *channels* (a few channels of large magnitude across all tokens), values do
not, so (KIVI, Liu et al. 2024):

- keys are quantized **per channel over groups of ``group_size`` tokens**: one scale and zero
  point per (layer, head, token group, channel);
- values are quantized **per token over groups of ``group_size`` channels**: one scale and zero
  point per (layer, head, token, channel group).

Asymmetric: ``x̂ = zero + code·scale`` with ``zero = min`` and ``scale = (max - zero) / (2^bits - 1)``
of the group, both stored as float16; codes are packed 2 or 4 to a byte along the channels. A
group size that does not divide the token count (keys) or head_dim (values) leaves a smaller last
group. The group size must be a multiple of 4 so that no byte of codes straddles two groups. The
default is 64, chosen by measurement on the reference model (docs/findings.md, Codecs): against groups of
32 it takes kivi4 from 5.0 to 4.5 bits per element (3.56x smaller than fp16) for +0.36% instead of
+0.08% perplexity, and it lost fewer pass keys (9/12 vs 6/12; 11/12 with the first block's sinks).

**Exact tokens of a growing sequence** (KIVI keeps the newest tokens in full precision; KVQuant
and others the first ones, the attention sinks). Two options keep tokens of a block in the
block's own dtype, outside the groups (the groups start after the sinks):

- ``sink_tokens=S``: the first S tokens, for the *first* block of a sequence (its attention sinks);
- ``residual_tokens=R``: the last R tokens, for the *tail* block of a sequence that is still
  growing (KIVI's residual window); when a later block completes, the former tail is stored
  again without it (``bench/refmodel.py`` ``codec_hook`` does exactly this).

Each costs ``n/T·(16 - bits)`` extra bits per element on that one block. The registered codecs
use neither (a codec does not know where its block sits); ``codec.replace(sink_tokens=S)`` builds
the first-block codec, and any ``kivi*`` codec decodes any of these payloads (the options travel
in the meta).

Payload (``quant.Layout``, one buffer): the sink and residual tokens ``[L, 2, H, S|R, D]`` (block
dtype), key scale and zero ``[L, H, ceil(Tq/G_k), D]``, value scale and zero ``[L, H, Tq, ceil(D/G_v)]``
(float16), key and value codes ``[L, H, Tq, ceil(D·bits/8)]`` (uint8), with ``Tq = T - S - R``.
The meta is ``{bits, k_group, v_group, sink, residual, rotate}``. Bits per element:
``bits + 16/G_k + 16/G_v`` (+ the exact tokens' share), e.g. 4.5 for ``kivi4`` and 2.5 for ``kivi2``.

**Rotation.** ``rotate=True`` multiplies K and V by an orthonormal Hadamard matrix over head_dim
before quantizing (QuaRot, RotateKV) and by its transpose (itself) after decoding. It spreads
outlier channels over all channels, which narrows the value groups; measured on the reference
model it lowers the perplexity increase of 2-bit KIVI (see docs/architecture.md, Codecs). The registered
``kivi2h`` is ``kivi2`` with the rotation.

On CUDA tensors the Triton kernels of ``triton_quant`` do the work; on the CPU the torch code
below does it, a few layers at a time so that no full-size float32 copy of the block is made.
Both produce the same payload.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kvtier.checks import check_int

from ..spec import KVSpec
from . import quant
from .base import register_codec
from .quant import (
    ErrorBound,
    Layout,
    check_finite,
    check_meta,
    check_out,
    check_quantizable,
    cpu_bytes,
    pack_bits,
    packed_len,
    payload_tensor,
    rounding_to,
    unpack_bits,
)

AXES = ("tokens", "channels")  # the axis a group runs along: keys over tokens, values over channels
_CHUNK_BYTES = 1 << 22  # the CPU path works on about this much float32 at a time (fewer, larger torch calls)


def _num_groups(n: int, group: int) -> int:
    return -(-n // group)


def stats_shape(shape: tuple[int, int, int, int], group: int, axis: str) -> tuple[int, int, int, int]:
    """Shape of the scale/zero of ``[L, H, T, D]`` grouped along ``axis``."""
    L, H, T, D = shape
    return (L, H, _num_groups(T, group), D) if axis == "tokens" else (L, H, T, _num_groups(D, group))


# -- torch reference (CPU path) ---------------------------------------------------------------------
def _pad_to(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``x`` extended along ``dim`` to ``size`` by repeating its last slice (min/max unchanged)."""
    n = x.shape[dim]
    if n == size:
        return x
    last = x.narrow(dim, n - 1, 1)
    reps = [1] * x.dim()
    reps[dim] = size - n
    return torch.cat((x, last.repeat(reps)), dim=dim)


def _grouped(x: torch.Tensor, group: int, axis: str) -> torch.Tensor:
    """``[l, H, T, D]`` -> ``[l, H, nG, G, D]`` (tokens) or ``[l, H, T, nG, G]`` (channels)."""
    l, H, T, D = x.shape
    if axis == "tokens":
        ng = _num_groups(T, group)
        return _pad_to(x, 2, ng * group).view(l, H, ng, group, D)
    ng = _num_groups(D, group)
    return _pad_to(x, 3, ng * group).view(l, H, T, ng, group)


def _ungrouped(xg: torch.Tensor, T: int, D: int, axis: str) -> torch.Tensor:
    if axis == "tokens":
        l, H, ng, G, _ = xg.shape
        return xg.reshape(l, H, ng * G, D)[:, :, :T]
    l, H, _, ng, G = xg.shape
    return xg.reshape(l, H, T, ng * G)[..., :D]


def _stat_dim(axis: str) -> int:
    return 3 if axis == "tokens" else 4  # the within-group dim of the grouped view


def _chunks(L: int, per_layer: int):
    """``(l0, l1)`` ranges of about ``_CHUNK_BYTES`` of float32 each (``per_layer`` elements a layer)."""
    step = max(1, _CHUNK_BYTES // max(1, per_layer * 4))
    return [(l0, min(L, l0 + step)) for l0 in range(0, L, step)], min(step, L)


def quantize_torch(x: torch.Tensor, bits: int, group: int, axis: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Quantize ``x`` ``[L, H, T, D]`` (any float dtype, any strides) into ``codes``
    ``[L, H, T, ceil(D·bits/8)]`` uint8 and ``scale``/``zero`` float16 of ``stats_shape``.

    Per group: ``zero = fp16(min)``, ``scale = fp16((max - zero) / (2^bits - 1))``,
    ``code = clamp(floor((x - zero) / scale + 0.5), 0, 2^bits - 1)`` (0 where scale is 0), all
    in float32 — the Triton kernel does exactly these operations. A few layers at a time go
    through one reused float32 buffer, every step in place (amin and amax apart: torch's fused
    ``aminmax`` is ten times slower on the CPU).
    """
    L, H, T, D = x.shape
    if T == 0:
        return
    qmax = (1 << bits) - 1
    sd = _stat_dim(axis)
    chunks, step = _chunks(L, H * T * D)
    buf = torch.empty((step, H, T, D), dtype=torch.float32, device=x.device)
    q8 = torch.empty((step, H, T, D), dtype=torch.int8, device=x.device)
    for l0, l1 in chunks:
        xs = buf[: l1 - l0].copy_(x[l0:l1])  # [l, H, T, D]
        xg = _grouped(xs, group, axis)
        mn, mx = xg.amin(sd, keepdim=True), xg.amax(sd, keepdim=True)
        z16 = mn.half()
        zf = z16.float()
        s16 = mx.sub_(zf).div_(qmax).half()
        sf = s16.float()
        # a zero (or negative: zero rounded above max) scale gives codes 0, as dividing by 1 does:
        # every x - zero of such a group is below 0.5
        safe = torch.where(sf > 0, sf, 1.0)
        # floor(v) for v = (x - zero)/scale + 0.5, clamped to [0, qmax]: clamping first, the
        # conversion to int8 (which truncates) is the floor (float -> int8 is fast, -> uint8 is not)
        y = xg.sub_(zf).div_(safe).add_(0.5).clamp_(0, qmax)
        q = q8[: l1 - l0].copy_(_ungrouped(y, T, D, axis))
        pack_bits(q.view(torch.uint8), bits, out=codes[l0:l1])
        scale[l0:l1] = s16.squeeze(sd)
        zero[l0:l1] = z16.squeeze(sd)


def dequantize_torch(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group: int,
    axis: str,
    out: torch.Tensor,
    rotation: torch.Tensor | None = None,
) -> None:
    """Inverse of ``quantize_torch``: ``out`` ``[L, H, T, D]`` (any float dtype, any strides)
    gets ``zero + code·scale`` computed in float32 (then ``@ rotation`` when one is given)."""
    L, H, T, D = out.shape
    if T == 0:
        return
    sd = _stat_dim(axis)
    chunks, step = _chunks(L, H * T * D)
    buf = torch.empty((step, H, T, D), dtype=torch.float32, device=out.device)
    for l0, l1 in chunks:
        xs = buf[: l1 - l0].copy_(unpack_bits(codes[l0:l1], bits, D))  # [l, H, T, D]
        xg = _grouped(xs, group, axis)
        xg.mul_(scale[l0:l1].float().unsqueeze(sd)).add_(zero[l0:l1].float().unsqueeze(sd))
        x = _ungrouped(xg, T, D, axis)
        if rotation is not None:
            x = x @ rotation
        out[l0:l1].copy_(x)


def group_extent(x: torch.Tensor, group: int, axis: str) -> torch.Tensor:
    """``max - min`` of the group each element of ``x`` ``[L, H, T, D]`` belongs to (float32)."""
    L, H, T, D = x.shape
    if T == 0:
        return x.float()
    xg = _grouped(x.float(), group, axis)
    mn, mx = torch.aminmax(xg, dim=_stat_dim(axis), keepdim=True)
    return _ungrouped((mx - mn).expand_as(xg), T, D, axis)


def hadamard(n: int, device=None) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix ``[n, n]`` (float32; n a power of two; symmetric)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).to(device)


# -- the codec --------------------------------------------------------------------------------------
class KiviCodec:
    """KIVI 2/4-bit codec (see the module docstring).

    Args:
        bits: 2 or 4.
        group_size: tokens per key group and channels per value group (a multiple of 4; 64 by
            default, capped by the block's tokens and head_dim).
        key_group_size, value_group_size: override ``group_size`` for keys or values alone
            (keys over larger token groups cost fewer bits: ``32 / G`` bits per key element).
        residual_tokens: the last R tokens of the block stay in the block's dtype (the tail
            block of a growing sequence).
        sink_tokens: the first S tokens of the block stay in the block's dtype (the first block
            of a sequence: its attention sinks).
        rotate: an orthonormal Hadamard rotation over head_dim before quantizing K and V
            (QuaRot / RotateKV), undone after decoding; spreads outlier channels over all
            channels. head_dim must be a power of two.
    """

    lossless = False

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        residual_tokens: int = 0,
        rotate: bool = False,
        *,
        sink_tokens: int = 0,
        first_block_sinks: int = 0,
        key_group_size: int | None = None,
        value_group_size: int | None = None,
        name: str | None = None,
    ) -> None:
        if bits not in (2, 4) or isinstance(bits, bool):
            raise ValueError(f"kivi bits must be 2 or 4, got {bits!r}")
        _check_group("group_size", group_size)
        key_group_size = group_size if key_group_size is None else key_group_size
        value_group_size = group_size if value_group_size is None else value_group_size
        _check_group("key_group_size", key_group_size)
        _check_group("value_group_size", value_group_size)
        for what, n in (("residual_tokens", residual_tokens), ("sink_tokens", sink_tokens), ("first_block_sinks", first_block_sinks)):
            check_int(what, n, low=0)
        if not isinstance(rotate, bool):
            raise ValueError(f"rotate must be a bool, got {rotate!r}")
        self.bits = bits
        self.key_group_size = key_group_size
        self.value_group_size = value_group_size
        self.residual_tokens = residual_tokens
        self.sink_tokens = sink_tokens
        self.first_block_sinks = first_block_sinks
        self._first_codec: KiviCodec | None = None
        self.rotate = rotate
        self.name = name or f"kivi{bits}"

    def replace(self, **changes) -> "KiviCodec":
        """A copy with some options changed (``sink_tokens=4`` for the first block of a sequence,
        ``residual_tokens=R`` for its tail block); the name stays, so frames still say ``kivi4``."""
        options: dict[str, Any] = dict(
            bits=self.bits,
            residual_tokens=self.residual_tokens,
            rotate=self.rotate,
            sink_tokens=self.sink_tokens,
            first_block_sinks=self.first_block_sinks,
            key_group_size=self.key_group_size,
            value_group_size=self.value_group_size,
            name=self.name,
        )
        unknown = set(changes) - set(options)
        if unknown:
            raise ValueError(f"KiviCodec has no option {sorted(unknown)}; options: {sorted(options)}")
        options.update(changes)
        bits = options.pop("bits")
        return KiviCodec(bits, **options)

    def for_block(self, first: bool) -> "KiviCodec":
        """The codec for a block at this place: the first block of a sequence keeps its first
        ``first_block_sinks`` tokens (the attention sinks) exact; every other block is this codec."""
        if not first or not self.first_block_sinks:
            return self
        if self._first_codec is None:
            self._first_codec = self.replace(sink_tokens=self.first_block_sinks, first_block_sinks=0)
        return self._first_codec

    def __repr__(self) -> str:
        return (
            f"KiviCodec(bits={self.bits}, key_group_size={self.key_group_size}, value_group_size={self.value_group_size}, "
            f"residual_tokens={self.residual_tokens}, sink_tokens={self.sink_tokens}, rotate={self.rotate}, name={self.name!r})"
        )

    # The worst-case error of one element, declared here and only here (derivation: the code
    # rounding is at most scale/2 = G/(2·(2^b-1)); rounding zero and scale to float16 adds at
    # most 2^-11·(|zero| + G) each, and |zero| <= |x| + G; float16 subnormal scales add `abs`).
    # With ``rotate`` the bound holds in the rotated domain; ``max_error`` carries it back.
    @property
    def error_bound(self) -> ErrorBound:
        qmax = (1 << self.bits) - 1
        return ErrorBound(rel=2.0**-10, span=1 / (2 * qmax) + 2.0**-9, abs=qmax * 2.0**-24)

    _META = ("bits", "k_group", "v_group", "sink", "residual", "rotate")

    def _options(self) -> dict:
        return {
            "bits": self.bits,
            "k_group": self.key_group_size,
            "v_group": self.value_group_size,
            "sink": self.sink_tokens,
            "residual": self.residual_tokens,
            "rotate": self.rotate,
        }

    @staticmethod
    def layout(spec: KVSpec, bits: int, k_group: int, v_group: int, residual: int, sink: int = 0) -> Layout:
        L, _, H, T, D = spec.block_shape
        tq = T - sink - residual
        return Layout(
            [
                ("sink", spec.torch_dtype, (L, 2, H, sink, D)),
                ("residual", spec.torch_dtype, (L, 2, H, residual, D)),
                ("k_scale", torch.float16, stats_shape((L, H, tq, D), k_group, "tokens")),
                ("k_zero", torch.float16, stats_shape((L, H, tq, D), k_group, "tokens")),
                ("v_scale", torch.float16, stats_shape((L, H, tq, D), v_group, "channels")),
                ("v_zero", torch.float16, stats_shape((L, H, tq, D), v_group, "channels")),
                ("k_codes", torch.uint8, (L, H, tq, packed_len(D, bits))),
                ("v_codes", torch.uint8, (L, H, tq, packed_len(D, bits))),
            ]
        )

    def _layout(self, spec: KVSpec) -> Layout:
        return self.layout(spec, self.bits, self.key_group_size, self.value_group_size, self.residual_tokens, self.sink_tokens)

    def bits_per_element(self, spec: KVSpec) -> float:
        """Exact bits per element of a payload for ``spec`` (scales, zero points, sink and
        residual tokens included)."""
        self._check_spec(spec)
        return 8.0 * self._layout(spec).nbytes / spec.block_numel

    def _check_spec(self, spec: KVSpec) -> None:
        if self.sink_tokens + self.residual_tokens > spec.block_tokens:
            raise ValueError(
                f"sink_tokens + residual_tokens ({self.sink_tokens} + {self.residual_tokens}) exceeds the block's {spec.block_tokens} tokens"
            )
        if self.rotate and spec.head_dim & (spec.head_dim - 1):
            raise ValueError(f"{self.name} rotates over head_dim, which must be a power of two, got {spec.head_dim}")

    def encode(self, block: torch.Tensor, spec: KVSpec):
        check_quantizable(block, spec, self.name)
        self._check_spec(spec)
        layout = self._layout(spec)
        buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=block.device)
        parts = layout.views(buf)
        s, e = self.sink_tokens, spec.block_tokens - self.residual_tokens  # quantized tokens [s, e)
        parts["sink"].copy_(block[:, :, :, :s])
        parts["residual"].copy_(block[:, :, :, e:])
        k, v = block[:, 0, :, s:e], block[:, 1, :, s:e]  # [L, H, Tq, D] views
        if self.rotate:  # the one full-size float32 copy of the codec (K and V rotated)
            rot = hadamard(spec.head_dim, block.device)
            k, v = k.float() @ rot, v.float() @ rot
        if quant.use_triton(block):
            from . import triton_quant as impl

            quantize = impl.kivi_quantize
        else:
            quantize = quantize_torch
        quantize(k, self.bits, self.key_group_size, "tokens", parts["k_codes"], parts["k_scale"], parts["k_zero"])
        quantize(v, self.bits, self.value_group_size, "channels", parts["v_codes"], parts["v_scale"], parts["v_zero"])
        for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
            check_finite(parts[name], "scales and zero points", self.name)
        return cpu_bytes(buf), self._options()

    def decode(self, payload, meta: dict, spec: KVSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        """Any kivi payload (whatever its bits, groups, sink, residual and rotation: they travel
        in ``meta``), into ``out`` when given (written in place, no full-size temporary unless the
        payload is rotated)."""
        check_meta(
            meta,
            "kivi",
            {
                "bits": (int, (2, 4)),
                "k_group": (int, None),
                "v_group": (int, None),
                "sink": (int, None),
                "residual": (int, None),
                "rotate": (bool, None),
            },
        )
        bits, k_group, v_group, sink, residual, rotate = (meta[k] for k in self._META)
        for what, g in (("k_group", k_group), ("v_group", v_group)):
            if g < 4 or g % 4 or g > MAX_GROUP:
                raise ValueError(f"kivi meta {what} must be a multiple of 4 within [4, {MAX_GROUP}], got {g}")
        if sink < 0 or residual < 0 or sink + residual > spec.block_tokens:
            raise ValueError(f"kivi meta sink + residual must be non-negative and within [0, {spec.block_tokens}], got {sink} + {residual}")
        if rotate and spec.head_dim & (spec.head_dim - 1):
            raise ValueError(f"kivi meta asks for a rotation, but head_dim {spec.head_dim} is not a power of two")
        if spec.torch_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"kivi decodes into float16, bfloat16 or float32 blocks, got a {spec.dtype} spec")
        check_out(out, spec)
        layout = self.layout(spec, bits, k_group, v_group, residual, sink)
        buf = payload_tensor(payload, layout.nbytes, "kivi")
        if out is None:
            out = torch.empty(spec.block_shape, dtype=spec.torch_dtype)
        elif out.device != buf.device:
            buf = buf.to(out.device)
        parts = layout.views(buf)
        for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
            check_finite(parts[name], "scales and zero points in the payload", "kivi")
        s, e = sink, spec.block_tokens - residual
        out[:, :, :, :s].copy_(parts["sink"])
        out[:, :, :, e:].copy_(parts["residual"])
        rot = hadamard(spec.head_dim, out.device) if rotate else None
        for kv, name, axis, group in ((0, "k", "tokens", k_group), (1, "v", "channels", v_group)):
            args = (parts[f"{name}_codes"], parts[f"{name}_scale"], parts[f"{name}_zero"], bits, group, axis)
            dst = out[:, kv, :, s:e]
            if not quant.use_triton(out):
                dequantize_torch(*args, dst, rot)
                continue
            from . import triton_quant as impl

            if rot is None:
                impl.kivi_dequantize(*args, dst)
            else:
                tmp = torch.empty(dst.shape, dtype=torch.float32, device=out.device)
                impl.kivi_dequantize(*args, tmp)
                dst.copy_(tmp @ rot)
        return out

    def max_error(self, block: torch.Tensor, spec: KVSpec) -> torch.Tensor:
        """The declared worst-case error of every element of ``block`` ``[L, 2, H, T, D]`` (float32):
        zero for the sink and residual tokens (stored as they are)."""
        check_quantizable(block, spec, self.name)
        self._check_spec(spec)
        x = block.float()
        s, e = self.sink_tokens, spec.block_tokens - self.residual_tokens
        extent = torch.zeros_like(x)
        base = x.clone()
        rot = hadamard(spec.head_dim) if self.rotate else None
        if rot is not None:
            base[:, :, :, s:e] = base[:, :, :, s:e] @ rot
        extent[:, 0, :, s:e] = group_extent(base[:, 0, :, s:e], self.key_group_size, "tokens")
        extent[:, 1, :, s:e] = group_extent(base[:, 1, :, s:e], self.value_group_size, "channels")
        b = self.error_bound
        if rot is None:
            err = torch.zeros_like(x)
            err[:, :, :, s:e] = b.allowed(x[:, :, :, s:e], extent[:, :, :, s:e], spec.torch_dtype)
            return err
        # rotated tokens: an error e_r in the rotated domain becomes H·e_r, whose elements are at
        # most sum|e_r| / sqrt(D) (|H_ij| = 1/sqrt(D)); float32 matmuls add a little more.
        e_r = b.rel * base.abs() + b.span * extent + b.abs
        spread = e_r[:, :, :, s:e].sum(-1, keepdim=True) / math.sqrt(spec.head_dim)
        fp32 = 2.0**-20 * base[:, :, :, s:e].abs().sum(-1, keepdim=True)
        err = torch.zeros_like(x)
        err[:, :, :, s:e] = rounding_to(spec.torch_dtype, spread + fp32, x[:, :, :, s:e].abs())
        return err


MAX_GROUP = 4096


def _check_group(what: str, g) -> None:
    # not check_int: the message names the whole constraint (a multiple of 4 in range)
    if not isinstance(g, int) or isinstance(g, bool) or g < 4 or g % 4 or g > MAX_GROUP:
        raise ValueError(f"{what} must be a multiple of 4 within [4, {MAX_GROUP}], got {g!r}")


register_codec("kivi4", lambda: KiviCodec(bits=4))
register_codec("kivi2", lambda: KiviCodec(bits=2))
register_codec("kivi2h", lambda: KiviCodec(bits=2, rotate=True, name="kivi2h"))
# the same, keeping the first 4 tokens of a sequence's first block exact when a tier stores it
# (``TieredStore`` says which blocks are first): what made kivi4 keep its pass keys (docs/findings.md, Codecs)
register_codec("kivi4s", lambda: KiviCodec(bits=4, first_block_sinks=4, name="kivi4s"))
register_codec("kivi2hs", lambda: KiviCodec(bits=2, rotate=True, first_block_sinks=4, name="kivi2hs"))
