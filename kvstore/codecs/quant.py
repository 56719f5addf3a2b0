"""Shared pieces of the lossy codecs: error bounds, payload layouts, meta checks, bit packing.

Every lossy codec declares, in its class, an ``ErrorBound``: a worst-case bound on the error of
each element after a round trip, relative to the element and to the extent of the quantization
group it belongs to. The codec's ``max_error(block, spec)`` evaluates it for a given block (the
only place the formula is evaluated) and the tests hold every codec to it on their own data.

A payload is one ``uint8`` buffer cut into typed sections (``Layout``). Sections are ordered by
element size, largest first, so every section starts aligned to its own element size and the
decoder can view the sections of a received buffer without copying them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Iterable

import torch

from ..spec import KVSpec

# unit roundoff (half an ulp at 1.0) of the dtypes a block may have
UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
# half the spacing of the subnormals of those dtypes: the absolute rounding error near zero
SUBNORMAL_HALF_SPACING: dict[torch.dtype, float] = {
    torch.float32: 2.0**-150,
    torch.float16: 2.0**-25,
    torch.bfloat16: 2.0**-134,
}
QUANTIZABLE = (torch.float16, torch.bfloat16, torch.float32)


def rounding_to(dtype: torch.dtype, e: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
    """An error bound ``e`` (float32) of a float32 result near ``x`` (``ax = |x|``), widened by
    the rounding of that result to ``dtype``: relative (unit roundoff) and, near zero, absolute."""
    u = UNIT_ROUNDOFF.get(dtype, 0.0)
    return e * (1 + u) + u * ax + SUBNORMAL_HALF_SPACING.get(dtype, 0.0)


@dataclass(frozen=True)
class ErrorBound:
    """``|x̂ - x| <= rel·|x| + span·G + abs`` for every element ``x``, where ``G`` is the extent of
    the element's quantization group (``max - min`` for asymmetric codecs, ``max |x|`` for
    symmetric ones; 0 for elements stored exactly), plus the rounding of the result to the
    block's dtype. ``ErrorBound()`` (all zero) is a bit-exact codec.
    """

    rel: float = 0.0
    span: float = 0.0
    abs: float = 0.0

    def allowed(self, x: torch.Tensor, extent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-element error allowed for ``x`` (float32) whose groups have ``extent`` (float32)."""
        ax = x.abs()
        return rounding_to(dtype, self.rel * ax + self.span * extent + self.abs, ax)


EXACT = ErrorBound()


def codec_bits_per_element(codec, spec: KVSpec) -> float:
    """Bits per element of ``codec`` on blocks of ``spec`` (scales and zero points included).

    Codecs that declare ``bits_per_element(spec)`` answer themselves (an upper bound for lossless
    stages, whose size depends on the data); a codec without it stores the block's own dtype.
    """
    fn = getattr(codec, "bits_per_element", None)
    return float(fn(spec)) if fn is not None else 8.0 * spec.torch_dtype.itemsize


def codec_error_bound(codec) -> ErrorBound:
    """The declared error bound of ``codec`` (exact for a lossless codec that declares none)."""
    bound = getattr(codec, "error_bound", None)
    if bound is None:
        if not codec.lossless:
            raise RuntimeError(f"lossy codec {codec.name!r} declares no error bound")
        return EXACT
    return bound


def codec_max_error(codec, block: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """The declared worst-case error of each element of ``block`` under ``codec`` (float32):
    ``codec.max_error`` where the codec has one, zeros for a lossless codec without it."""
    fn = getattr(codec, "max_error", None)
    if fn is not None:
        return fn(block, spec)
    if not codec.lossless:
        raise RuntimeError(f"lossy codec {codec.name!r} declares no max_error")
    spec.check_block(block)
    return torch.zeros(block.shape, dtype=torch.float32, device=block.device)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the codecs run their Triton kernels on ``t`` (CUDA tensors) or their torch code."""
    return t.is_cuda


def check_quantizable(block: torch.Tensor, spec: KVSpec, codec_name: str) -> None:
    """ValueError unless ``block`` is a block of ``spec`` in a dtype the lossy codecs take."""
    spec.check_block(block)
    if spec.torch_dtype not in QUANTIZABLE:
        raise ValueError(f"codec {codec_name!r} quantizes float16, bfloat16 or float32 blocks, got a {spec.dtype} spec")


def check_out(out: torch.Tensor | None, spec: KVSpec) -> None:
    if out is not None:
        spec.check_block(out)


# -- meta -------------------------------------------------------------------------------------------
def check_meta(meta, codec_name: str, expected: dict[str, tuple[type, Iterable | None]]) -> dict:
    """Validate a codec meta dict: exactly the ``expected`` keys, each of its type and, when a
    collection of allowed values is given, one of them. Returns the meta; ValueError otherwise."""
    if not isinstance(meta, dict):
        raise ValueError(f"{codec_name} meta must be a dict, got {type(meta).__name__}")
    if set(meta) != set(expected):
        raise ValueError(f"{codec_name} meta must have keys {sorted(expected)}, got {sorted(map(str, meta))}")
    for key, (typ, allowed) in expected.items():
        value = meta[key]
        if type(value) is not typ:  # bool is not int here
            raise ValueError(f"{codec_name} meta {key!r} must be {typ.__name__}, got {value!r}")
        if allowed is not None and value not in allowed:
            raise ValueError(f"{codec_name} meta {key!r} must be one of {allowed!r}, got {value!r}")
    return meta


# -- payload layout ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Layout:
    """Named, typed sections of one payload buffer, each aligned to its element size."""

    def __init__(self, parts: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        ordered = sorted(enumerate(parts), key=lambda ip: (-ip[1][1].itemsize, ip[0]))
        offset = 0
        sections = {}
        for _, (name, dtype, shape) in ordered:
            sections[name] = Section(name, dtype, tuple(int(s) for s in shape), offset)
            offset += sections[name].nbytes
        self.sections = sections
        self.nbytes = offset

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of ``buf`` (a flat uint8 tensor of exactly ``nbytes``), one per section."""
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != self.nbytes:
            raise ValueError(f"payload has {buf.numel()} bytes, expected {self.nbytes}")
        return {s.name: buf[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.sections.values()}


def payload_tensor(payload, nbytes: int, codec_name: str) -> torch.Tensor:
    """A flat uint8 tensor over ``payload`` (no copy), ValueError unless it has ``nbytes`` bytes."""
    try:
        view = memoryview(payload).cast("B")
    except TypeError as e:
        raise ValueError(f"{codec_name} payload must be a bytes-like buffer: {e}") from None
    if view.nbytes != nbytes:
        raise ValueError(f"{codec_name} payload has {view.nbytes} bytes, expected {nbytes} for this spec and meta")
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    import warnings

    with warnings.catch_warnings():  # read-only buffers (bytes from a tier) give read-only tensors
        warnings.simplefilter("ignore")
        return torch.frombuffer(view, dtype=torch.uint8)


def open_payload(codec, payload, meta, spec: KVSpec, out: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What every scale-based decode starts with: check the meta (empty), the spec's dtype and
    ``out``; view ``payload`` as the codec's ``layout(spec)`` sections (on ``out``'s device).
    Returns ``(sections, out)``, ``out`` allocated when not given."""
    check_meta(meta, codec.name, {})
    if spec.torch_dtype not in QUANTIZABLE:
        raise ValueError(f"{codec.name} decodes into float16, bfloat16 or float32 blocks, got a {spec.dtype} spec")
    check_out(out, spec)
    layout = codec.layout(spec)
    buf = payload_tensor(payload, layout.nbytes, codec.name)
    if out is None:
        out = torch.empty(spec.block_shape, dtype=spec.torch_dtype)
    elif out.device != buf.device:
        buf = buf.to(out.device)
    return layout.views(buf), out


def cpu_bytes(buf: torch.Tensor) -> memoryview:
    """The bytes of a flat uint8 tensor as a memoryview (copied to the host when on a device)."""
    if buf.device.type != "cpu":
        buf = buf.cpu()
    return memoryview(buf.numpy())


def check_finite(t: torch.Tensor, what: str, codec_name: str) -> None:
    # max |t| is NaN or inf exactly when some element is (and far cheaper than isfinite on float16)
    if t.numel() and not bool(torch.isfinite(t.float().abs().amax())):
        raise ValueError(f"{codec_name}: {what} are not finite (NaN/inf in the block, or values beyond the float16 range of the scales)")


# -- bit packing ------------------------------------------------------------------------------------
def packed_len(n: int, bits: int) -> int:
    """Bytes that hold ``n`` codes of ``bits`` bits each (``8 // bits`` codes per byte)."""
    per_byte = 8 // bits
    return -(-n // per_byte)


# a word of 8 // bits codes, one per byte: the packing works on whole words (little-endian hosts)
_WORD = {1: torch.int64, 2: torch.int32, 4: torch.int16}
_LITTLE_ENDIAN = sys.byteorder == "little"


def pack_bits(codes: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack codes ``[..., n]`` (uint8, each < 2**bits) along the last dim: ``[..., ceil(n·bits/8)]``.

    Code ``j·(8/bits) + k`` of a row goes to bits ``[k·bits, (k+1)·bits)`` of byte ``j``
    (lowest bits first); a partial last byte is padded with zero codes. Neighbouring codes are
    read as one integer word and folded pairwise with one shift and one multiply-subtract per
    stage (one stage for 4 bits, two for 2 bits): no per-code temporaries.
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
    per_byte = 8 // bits
    n = codes.shape[-1]
    m = packed_len(n, bits)
    if out is None:
        out = torch.empty((*codes.shape[:-1], m), dtype=torch.uint8, device=codes.device)
    if bits == 8:
        return out.copy_(codes)
    if m * per_byte != n:
        pad = codes.new_zeros(*codes.shape[:-1], m * per_byte - n)
        codes = torch.cat((codes, pad), dim=-1)
    if not _LITTLE_ENDIAN or codes.numel() == 0:
        c = codes.reshape(*codes.shape[:-1], m, per_byte)
        out.copy_(c[..., 0])
        for k in range(1, per_byte):
            out |= c[..., k] << (bits * k)
        return out
    # fold neighbours pairwise: two units u0 + 2^W·u1 (W = 8, 16, 32: the unit width) of a word
    # twice as wide become u0 + 2^k·u1 (k: the bits already in a unit) = word - (2^W - 2^k)·u1
    w = codes.contiguous().view(torch.uint8)
    if w.storage_offset() % per_byte:  # a dtype view needs whole words
        w = w.clone()
    width, k = 8, bits
    while k < 8:
        w = w.view({8: torch.int16, 16: torch.int32, 32: torch.int64}[width])
        w = torch.sub(w, w >> width, alpha=(1 << width) - (1 << k))
        width, k = 2 * width, 2 * k
    return out.copy_(w)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: codes ``[..., n]`` (uint8) from ``[..., ceil(n·bits/8)]`` bytes."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
    if packed.shape[-1] != packed_len(n, bits):
        raise ValueError(f"{packed.shape[-1]} packed bytes cannot hold exactly {n} codes of {bits} bits")
    if bits == 8:
        return packed.clone()
    if not _LITTLE_ENDIAN or packed.numel() == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # [per_byte]
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., m, per_byte]
        return codes.reshape(*packed.shape[:-1], -1)[..., :n]
    # the packing's stages backwards: a unit of width W holding k code bits, lo + 2^(k/2)·hi,
    # becomes two units of width W/2, lo + 2^(W/2)·hi = unit + (2^(W/2) - 2^(k/2))·hi
    p = packed.to(_WORD[bits])  # [..., m]: one packed byte per word
    width, k = 8 * (8 // bits), 8
    while k > bits:
        h = k // 2
        p = torch.add(p, p >> h, alpha=(1 << (width // 2)) - (1 << h))
        width, k = width // 2, h
        p = p.view({8: torch.int8, 16: torch.int16, 32: torch.int32}[width])
    return p.view(torch.uint8)[..., :n]  # byte k of each word = code k
