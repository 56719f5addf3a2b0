"""fp8: float8 e4m3 with one float32 scale per (layer, K/V, KV head).

``scale = max|x| / 448`` over the ``[T, D]`` tokens of one head (448 is the largest e4m3 value),
``code = e4m3(x / scale)`` rounded to nearest; ``x̂ = code·scale``. e4m3 keeps 3 mantissa bits, so
the error is relative (at most 2^-4 of the value) down to the subnormal range. Payload: the
float32 scales ``[L, 2, H]`` then the e4m3 codes ``[L, 2, H, T, D]``. Plain torch on any device.
"""

from __future__ import annotations

import torch

from ..spec import KVSpec
from .base import register_codec
from .quant import ErrorBound, Layout, check_finite, check_quantizable, cpu_bytes, open_payload

E4M3_MAX = 448.0
_CHUNK_BYTES = 1 << 20


class Fp8Codec:
    name = "fp8"
    lossless = False
    # e4m3 rounding: at most 2^-4 relative for normal values, half the subnormal spacing
    # (2^-10) times the scale G/448 below them; float32 scaling adds a few 2^-24.
    error_bound = ErrorBound(rel=2.0**-4 + 2.0**-20, span=2.0**-10 / E4M3_MAX, abs=0.0)

    @staticmethod
    def layout(spec: KVSpec) -> Layout:
        L, _, H, T, D = spec.block_shape
        return Layout([("scale", torch.float32, (L * 2 * H,)), ("codes", torch.uint8, (L * 2 * H, T * D))])

    def bits_per_element(self, spec: KVSpec) -> float:
        return 8.0 * self.layout(spec).nbytes / spec.block_numel

    def encode(self, block: torch.Tensor, spec: KVSpec):
        check_quantizable(block, spec, self.name)
        L, _, H, T, D = spec.block_shape
        layout = self.layout(spec)
        buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=block.device)
        parts = layout.views(buf)
        x = block.reshape(L * 2 * H, T * D)
        codes = parts["codes"].view(torch.float8_e4m3fn)
        step = max(1, _CHUNK_BYTES // max(1, T * D * 4))
        for n0 in range(0, x.shape[0], step):
            xs = x[n0 : n0 + step].float()
            scale = xs.abs().amax(-1, keepdim=True) / E4M3_MAX
            y = torch.where(scale > 0, xs / scale, 0.0).clamp_(-E4M3_MAX, E4M3_MAX)
            codes[n0 : n0 + step] = y.to(torch.float8_e4m3fn)
            parts["scale"][n0 : n0 + step] = scale.squeeze(-1)
        check_finite(parts["scale"], "scales", self.name)
        return cpu_bytes(buf), {}

    def decode(self, payload, meta: dict, spec: KVSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        parts, out = open_payload(self, payload, meta, spec, out)
        scale = parts["scale"]
        check_finite(scale, "scales in the payload", self.name)
        if bool(((parts["codes"] & 0x7F) == 0x7F).any()):  # e4m3fn NaN: never written by encode
            raise ValueError("fp8 payload holds NaN codes: it is corrupt")
        L, _, H, T, D = spec.block_shape
        codes = parts["codes"].view(torch.float8_e4m3fn)
        dst = out if out.is_contiguous() else torch.empty(spec.block_shape, dtype=out.dtype, device=out.device)
        rows = dst.view(L * 2 * H, T * D)
        step = max(1, _CHUNK_BYTES // max(1, T * D * 4))
        for n0 in range(0, L * 2 * H, step):
            rows[n0 : n0 + step].copy_(codes[n0 : n0 + step].float().mul_(scale[n0 : n0 + step].unsqueeze(-1)))
        if dst is not out:
            out.copy_(dst)
        return out

    def max_error(self, block: torch.Tensor, spec: KVSpec) -> torch.Tensor:
        """The declared worst-case error of every element of ``block`` (float32)."""
        check_quantizable(block, spec, self.name)
        x = block.float()
        extent = x.abs().amax(dim=(-2, -1), keepdim=True).expand_as(x)
        return self.error_bound.allowed(x, extent, spec.torch_dtype)


register_codec("fp8", Fp8Codec)
