"""Page-addressable codecs: a block laid out so that one (layer, KV head, page of P tokens) is one
contiguous, separately readable and separately verified byte range, followed by the block's page
summaries.

Payload (``P`` = ``page_tokens``, 16; ``Np = T / P``; ``R = L * H_kv * Np`` ranges)::

    ranges   R x range_bytes    range (l, h, p) at (l * H_kv + h) * Np + p: K page then V page
    summary  per layer l, per KV head h:  kmin, kmax, kmean  [Np, D]   (page Quest bounds, mean key)
             then bmin, bmax  [L, H_kv, D]                               (the same bounds per block)

Every range has the same size (the page codecs below have a fixed output size), so the offset
table is ``offset(r) = r * range_bytes`` and the ranges of one (layer, head) are adjacent: the
selected pages of a head read as few spans. The meta holds an XXH3-64 checksum per range and
one per (layer, KV head) summary section (plus one for the block level), so a reader of any range,
or of one head's page summaries of one layer (``sum_v`` 2: a decode step reads only the summaries
of the heads whose candidate blocks it scores), verifies the bytes it got without reading the rest
of the block.

Summary layout versions (``meta["sum_v"]``; frames written before it have no such key):

- 1: per layer ``kmin, kmax, kmean [H_kv, Np, D]``, one checksum per layer (readable, never written now);
- 2 (written): per layer ``[H_kv, 3, Np, D]`` (one contiguous section per head), one checksum per
  (layer, head). A version this code does not know is a ValueError naming it.

Page codecs (the quantization groups never cross a page, so a page decodes alone):

- ``paged``: the block's own bytes (``[2, P, D]`` per range);
- ``paged_int8``: symmetric int8, one float16 scale per token (``kvstore.codecs.int8``'s
  quantizer and bound): ``[2, P]`` scales then ``[2, P, D]`` codes per range.

Summaries are float16 for float16 blocks and float32 otherwise; bounds are rounded outward
(min down, max up), so a Quest score from them stays an upper bound.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvtier.checks import check_int
import xxhash

from ..spec import KVSpec
from .base import register_codec
from .int8 import Int8Codec, dequantize_torch, quantize_torch
from .quant import check_finite, check_quantizable

PAGE_TOKENS = 16
_META_KEYS_V1 = {"P", "page", "range_bytes", "ranges", "crc", "sum_dtype", "sum_offset", "sum_layer_bytes", "sum_crc"}
_META_KEYS = _META_KEYS_V1 | {"sum_v"}
SUMMARY_VERSION = 2  # the summary layout written (see the module docstring)


def checksums(buf: np.ndarray, size: int) -> np.ndarray:
    """XXH3-64 of each ``size``-byte piece of the flat uint8 array ``buf`` (uint64)."""
    view = buf.data
    n = len(buf) // size
    out: np.ndarray = np.empty(n, dtype=np.uint64)
    h = xxhash.xxh3_64_intdigest
    for i in range(n):
        out[i] = h(view[i * size : (i + 1) * size])
    return out


def _round(x: torch.Tensor, dtype: torch.dtype, direction: float) -> torch.Tensor:
    y = x.to(dtype)
    off = (y.float() > x) if direction < 0 else (y.float() < x)
    if off.any():
        y = torch.where(off, torch.nextafter(y, torch.full_like(y, direction * math.inf)), y)
    return y


class PagedCodec:
    """A block as page ranges plus summaries (see the module docstring)."""

    lossless: bool

    def __init__(self, page: str = "identity", page_tokens: int = PAGE_TOKENS) -> None:
        if page not in ("identity", "int8"):
            raise ValueError(f"page codec must be 'identity' or 'int8', got {page!r}")
        check_int("page_tokens", page_tokens, low=1)
        self.page = page
        self.page_tokens = page_tokens
        self.name = "paged" if page == "identity" else "paged_int8"
        self.lossless = page == "identity"
        if page == "int8":
            self.error_bound = Int8Codec.error_bound

    # -- sizes -----------------------------------------------------------------------------
    def range_bytes(self, spec: KVSpec) -> int:
        P, D = self.page_tokens, spec.head_dim
        if self.page == "identity":
            return 2 * P * D * spec.torch_dtype.itemsize
        return 2 * P * 2 + 2 * P * D

    def summary_dtype(self, spec: KVSpec) -> torch.dtype:
        return torch.float16 if spec.torch_dtype == torch.float16 else torch.float32

    def bits_per_element(self, spec: KVSpec) -> float:
        L, _, H, T, D = spec.block_shape
        Np = T // self.page_tokens
        s = self.summary_dtype(spec).itemsize
        total = L * H * Np * self.range_bytes(spec) + L * 3 * H * Np * D * s + 2 * L * H * D * s
        return 8.0 * total / spec.block_numel

    def _check_spec(self, spec: KVSpec) -> None:
        if spec.block_tokens % self.page_tokens:
            raise ValueError(f"{self.name}: block_tokens={spec.block_tokens} is not a multiple of page_tokens={self.page_tokens}")

    # -- encode ----------------------------------------------------------------------------
    def encode(self, block: torch.Tensor, spec: KVSpec):
        if self.page == "int8":
            check_quantizable(block, spec, self.name)
            check_finite(block, "the block's values", self.name)
        else:
            spec.check_block(block)
        self._check_spec(spec)
        block = block.detach().cpu()
        L, _, H, T, D = spec.block_shape
        P = self.page_tokens
        Np = T // P
        R = L * H * Np
        pages = block.reshape(L, 2, H, Np, P, D).permute(0, 2, 3, 1, 4, 5)  # [L, H, Np, 2, P, D]
        rb = self.range_bytes(spec)
        if self.page == "identity":
            ranges = pages.contiguous().view(torch.uint8).reshape(R, rb)
        else:
            codes = torch.empty((R * 2, P, D), dtype=torch.int8)
            scale = torch.empty((R * 2, P), dtype=torch.float16)
            quantize_torch(pages.reshape(R * 2, P, D), codes, scale)
            ranges = torch.cat([scale.view(torch.uint8).reshape(R, 4 * P), codes.view(torch.uint8).reshape(R, 2 * P * D)], 1)
        sdt = self.summary_dtype(spec)
        keys = block[:, 0].float().reshape(L, H, Np, P, D)
        kmin = _round(keys.amin(3), sdt, -1.0)  # [L, H, Np, D]
        kmax = _round(keys.amax(3), sdt, +1.0)
        kmean = keys.mean(3).to(sdt)
        per_layer = torch.stack([kmin, kmax, kmean], 2)  # [L, H, 3, Np, D]: one section per (layer, head)
        bmin, bmax = kmin.amin(2), kmax.amax(2)  # [L, H, D] (already rounded outward)
        summary = torch.cat(
            [per_layer.reshape(L, -1).view(torch.uint8).reshape(-1), torch.stack([bmin, bmax]).reshape(-1).view(torch.uint8)]
        )
        payload = torch.cat([ranges.reshape(-1), summary]).numpy()
        layer_bytes = 3 * H * Np * D * sdt.itemsize
        sum_offset = R * rb
        sum_crc = list(checksums(payload[sum_offset : sum_offset + L * layer_bytes], layer_bytes // H))  # per (layer, head)
        sum_crc.append(xxhash.xxh3_64_intdigest(memoryview(payload[sum_offset + L * layer_bytes :])))
        meta = {
            "P": P,
            "page": self.page,
            "range_bytes": rb,
            "ranges": R,
            "crc": checksums(payload[:sum_offset], rb).tobytes(),
            "sum_dtype": "float16" if sdt == torch.float16 else "float32",
            "sum_offset": sum_offset,
            "sum_layer_bytes": layer_bytes,
            "sum_crc": np.array(sum_crc, dtype=np.uint64).tobytes(),
            "sum_v": SUMMARY_VERSION,
        }
        return memoryview(payload), meta

    # -- decode ----------------------------------------------------------------------------
    def check_meta(self, meta, spec: KVSpec) -> dict:
        """``meta`` validated against this codec and ``spec`` (ValueError otherwise)."""
        if isinstance(meta, dict) and "sum_v" in meta and meta["sum_v"] not in (1, 2):
            raise ValueError(
                f"{self.name}: summary layout version {meta['sum_v']!r} is not known to this kvtier (it reads 1 and 2): "
                "the block was written by a newer version"
            )
        if not isinstance(meta, dict) or set(meta) not in (_META_KEYS, _META_KEYS_V1):
            raise ValueError(
                f"{self.name} meta must have keys {sorted(_META_KEYS)}, got {sorted(map(str, meta)) if isinstance(meta, dict) else type(meta).__name__}"
            )
        self._check_spec(spec)
        L, _, H, T, D = spec.block_shape
        Np = T // self.page_tokens
        R = L * H * Np
        sdt = self.summary_dtype(spec)
        want = {
            "P": self.page_tokens,
            "page": self.page,
            "range_bytes": self.range_bytes(spec),
            "ranges": R,
            "sum_dtype": "float16" if sdt == torch.float16 else "float32",
            "sum_offset": R * self.range_bytes(spec),
            "sum_layer_bytes": 3 * H * Np * D * sdt.itemsize,
        }
        for k, v in want.items():
            if meta[k] != v:
                raise ValueError(f"{self.name} meta {k!r} must be {v!r} for this spec, got {meta[k]!r}")
        if not isinstance(meta["crc"], bytes) or len(meta["crc"]) != 8 * R:
            raise ValueError(f"{self.name} meta 'crc' must hold {R} checksums")
        n_sum = L + 1 if meta.get("sum_v", 1) == 1 else L * H + 1
        if not isinstance(meta["sum_crc"], bytes) or len(meta["sum_crc"]) != 8 * n_sum:
            raise ValueError(f"{self.name} meta 'sum_crc' must hold {n_sum} checksums")
        return meta

    def payload_bytes(self, spec: KVSpec) -> int:
        L, _, H, T, D = spec.block_shape
        Np = T // self.page_tokens
        s = self.summary_dtype(spec).itemsize
        return L * H * Np * self.range_bytes(spec) + L * 3 * H * Np * D * s + 2 * L * H * D * s

    def decode_ranges(self, buf, n: int, spec: KVSpec, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``n`` ranges (their bytes back to back in ``buf``) as ``[n, 2, P, D]`` of ``dtype``
        (the spec's by default)."""
        P, D = self.page_tokens, spec.head_dim
        rb = self.range_bytes(spec)
        view = memoryview(buf).cast("B")
        if view.nbytes != n * rb:
            raise ValueError(f"{self.name}: {n} ranges need {n * rb} bytes, got {view.nbytes}")
        dtype = spec.torch_dtype if dtype is None else dtype
        if n == 0:
            return torch.empty((0, 2, P, D), dtype=dtype)
        raw = torch.frombuffer(bytearray(view), dtype=torch.uint8).view(n, rb)  # one copy: writable, aligned
        if self.page == "identity":
            return raw.view(spec.torch_dtype).view(n, 2, P, D).to(dtype)
        scale = raw[:, : 4 * P].contiguous().view(torch.float16).view(n * 2, P)
        codes = raw[:, 4 * P :].contiguous().view(torch.int8).view(n * 2, P, D)
        out = torch.empty((n * 2, P, D), dtype=dtype)
        dequantize_torch(codes, scale, out)
        return out.view(n, 2, P, D)

    def decode(self, payload, meta: dict, spec: KVSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is not None:
            spec.check_block(out)
        self.check_meta(meta, spec)
        view = memoryview(payload).cast("B")
        if view.nbytes != self.payload_bytes(spec):
            raise ValueError(f"{self.name} payload has {view.nbytes} bytes, expected {self.payload_bytes(spec)}")
        L, _, H, T, D = spec.block_shape
        P = self.page_tokens
        Np = T // P
        R = L * H * Np
        pages = self.decode_ranges(view[: meta["sum_offset"]], R, spec)  # [R, 2, P, D]
        block = pages.view(L, H, Np, 2, P, D).permute(0, 3, 1, 2, 4, 5).reshape(spec.block_shape)
        if out is None:
            return block.contiguous()
        out.copy_(block)
        return out

    def max_error(self, block: torch.Tensor, spec: KVSpec) -> torch.Tensor:
        if self.page == "identity":
            spec.check_block(block)
            return torch.zeros(block.shape, dtype=torch.float32)
        return Int8Codec().max_error(block, spec)


register_codec("paged", lambda: PagedCodec("identity"))
register_codec("paged_int8", lambda: PagedCodec("int8"))
