"""The identity codec: the block's bytes as they are."""

from __future__ import annotations

import torch

from ..spec import KVSpec
from .base import register_codec, tensor_bytes, tensor_from_bytes


class IdentityCodec:
    name = "identity"
    lossless = True

    def encode(self, block: torch.Tensor, spec: KVSpec):
        spec.check_block(block)
        return tensor_bytes(block), {}

    def decode(self, payload, meta: dict, spec: KVSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        if meta != {}:
            raise ValueError(f"identity meta must be empty, got {meta!r}")
        t = tensor_from_bytes(payload, spec.torch_dtype, spec.block_shape)
        if out is None:
            return t.clone()
        spec.check_block(out)
        out.copy_(t)
        return out


register_codec("identity", IdentityCodec)
