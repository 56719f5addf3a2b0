"""int8: symmetric 8-bit quantization, one scale per token and KV head.

``scale = fp16(max|x| / 127)`` over the ``D`` channels of one (layer, K/V, head, token), and
``code = clamp(floor(x / scale + 0.5), -127, 127)``; ``x̂ = code·scale``. Payload: the float16
scales ``[L, 2, H, T]`` then the int8 codes ``[L, 2, H, T, D]`` (``8 + 16/D`` bits per element).
CUDA tensors go through the Triton kernels of ``triton_quant``; CPU tensors through the torch
code here, which does the same float32 operations.
"""

from __future__ import annotations

import torch

from ..spec import KVSpec
from . import quant
from .base import register_codec
from .quant import ErrorBound, Layout, check_finite, check_quantizable, cpu_bytes, open_payload

_CHUNK_BYTES = 1 << 22  # float32 worked on at a time by the CPU path


def quantize_torch(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """``x`` ``[N, T, D]`` (float) -> ``codes`` ``[N, T, D]`` int8 and ``scale`` ``[N, T]`` float16.

    A few rows at a time through one reused float32 buffer, every step in place; ``max|x|`` is
    ``max(amax, -amin)`` (no ``abs`` copy). A zero scale divides by 1 instead: every ``|x|`` of
    such a token is below 127·2^-25, so its codes are 0 either way.
    """
    N, T, D = x.shape
    step = max(1, _CHUNK_BYTES // max(1, T * D * 4))
    buf = torch.empty((min(step, N), T, D), dtype=torch.float32, device=x.device)
    for n0 in range(0, N, step):
        xs = buf[: min(step, N - n0)].copy_(x[n0 : n0 + step])
        amax = torch.maximum(xs.amax(-1, keepdim=True), xs.amin(-1, keepdim=True).neg_())
        s16 = amax.div_(127).half()
        sf = s16.float()
        xs.div_(torch.where(sf > 0, sf, 1.0)).add_(0.5).floor_().clamp_(-127, 127)
        codes[n0 : n0 + step] = xs
        scale[n0 : n0 + step] = s16.squeeze(-1)


def dequantize_torch(codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` ``[N, T, D]`` (any float dtype) = ``codes·scale`` computed in float32."""
    N, T, D = out.shape
    step = max(1, _CHUNK_BYTES // max(1, T * D * 4))
    for n0 in range(0, N, step):
        out[n0 : n0 + step].copy_(codes[n0 : n0 + step].float().mul_(scale[n0 : n0 + step].float().unsqueeze(-1)))


class Int8Codec:
    name = "int8"
    lossless = False
    # |x̂ - x| <= scale/2 = G/254 with G = max|x| of the (token, head); rounding the scale to
    # float16 adds 2^-11·G at the clamp; float16 subnormal scales add `abs`.
    error_bound = ErrorBound(rel=0.0, span=1 / 254 + 2.0**-10, abs=127 * 2.0**-24)

    @staticmethod
    def layout(spec: KVSpec) -> Layout:
        L, _, H, T, D = spec.block_shape
        return Layout([("scale", torch.float16, (L * 2 * H, T)), ("codes", torch.int8, (L * 2 * H, T, D))])

    def bits_per_element(self, spec: KVSpec) -> float:
        return 8.0 * self.layout(spec).nbytes / spec.block_numel

    def encode(self, block: torch.Tensor, spec: KVSpec):
        check_quantizable(block, spec, self.name)
        L, _, H, T, D = spec.block_shape
        layout = self.layout(spec)
        buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=block.device)
        parts = layout.views(buf)
        x = block.reshape(L * 2 * H, T, D)
        if quant.use_triton(block):
            from .triton_quant import int8_quantize

            int8_quantize(x, parts["codes"], parts["scale"])
        else:
            quantize_torch(x, parts["codes"], parts["scale"])
        check_finite(parts["scale"], "scales", self.name)
        return cpu_bytes(buf), {}

    def decode(self, payload, meta: dict, spec: KVSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        parts, out = open_payload(self, payload, meta, spec, out)
        check_finite(parts["scale"], "scales in the payload", self.name)
        L, _, H, T, D = spec.block_shape
        dst = out if out.is_contiguous() else torch.empty(spec.block_shape, dtype=out.dtype, device=out.device)
        if quant.use_triton(dst):
            from .triton_quant import int8_dequantize

            int8_dequantize(parts["codes"], parts["scale"], dst.view(L * 2 * H, T, D))
        else:
            dequantize_torch(parts["codes"], parts["scale"], dst.view(L * 2 * H, T, D))
        if dst is not out:
            out.copy_(dst)
        return out

    def max_error(self, block: torch.Tensor, spec: KVSpec) -> torch.Tensor:
        """The declared worst-case error of every element of ``block`` (float32)."""
        check_quantizable(block, spec, self.name)
        x = block.float()
        extent = x.abs().amax(-1, keepdim=True).expand_as(x)
        return self.error_bound.allowed(x, extent, spec.torch_dtype)


register_codec("int8", Int8Codec)
