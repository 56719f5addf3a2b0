"""KVSpec: the shape of one model's KV cache, and the layout of a block.

A block holds ``block_tokens`` consecutive tokens for all layers, laid out
``[num_layers, 2, num_kv_heads, block_tokens, head_dim]`` (layer-major, K then V, HND),
so a layer range is one contiguous slice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

# Names accepted in a spec, and the torch dtype each one means. The name (not the torch
# object) is what goes into fingerprints and frames, so it must stay stable.
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical name of a dtype given as a torch dtype or a (possibly aliased) name."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype}; expected one of {sorted(DTYPES)}")
        return DTYPE_NAMES[dtype]
    name = _ALIASES.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return name


@dataclass(frozen=True)
class KVSpec:
    """What a block of KV is: which model, how many layers/heads, which dtype, how many tokens.

    The fingerprint of a spec goes into every block key, so two models (or two dtypes or
    block sizes of one model) never share a block.
    """

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    block_tokens: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id or len(self.model_id) > 256:
            raise ValueError(f"model_id must be a non-empty string of at most 256 chars, got {self.model_id!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.block_tokens % 16:
            raise ValueError(f"block_tokens must be a multiple of 16, got {self.block_tokens}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """``[num_layers, 2, num_kv_heads, block_tokens, head_dim]``."""
        return (self.num_layers, 2, self.num_kv_heads, self.block_tokens, self.head_dim)

    @property
    def block_numel(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.block_tokens * self.head_dim

    @property
    def block_nbytes(self) -> int:
        return self.block_numel * self.torch_dtype.itemsize

    @property
    def fingerprint(self) -> bytes:
        """32-byte SHA-256 of the canonical form of the spec (stable across processes)."""
        canon = f"kvspec/v1|{self.model_id}|{self.num_layers}|{self.num_kv_heads}|{self.head_dim}|{self.dtype}|{self.block_tokens}"
        return hashlib.sha256(canon.encode()).digest()

    @property
    def short_fingerprint(self) -> str:
        """First 8 hex characters of the fingerprint: the per-model part of Redis keys."""
        return self.fingerprint.hex()[:8]

    def to_dict(self) -> dict:
        return {
            "model_id": self.model_id,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "block_tokens": self.block_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "KVSpec":
        if not isinstance(d, dict):
            raise ValueError(f"a spec must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {"model_id", "num_layers", "num_kv_heads", "head_dim", "dtype", "block_tokens"}
        if unknown:
            raise ValueError(f"unknown spec fields {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:  # missing fields
            raise ValueError(f"invalid spec: {e}") from None

    def check_block(self, block: torch.Tensor) -> None:
        """Raise ValueError unless ``block`` is one block of this spec."""
        if not isinstance(block, torch.Tensor):
            raise ValueError(f"a block must be a torch.Tensor, got {type(block).__name__}")
        if tuple(block.shape) != self.block_shape:
            raise ValueError(f"block shape must be {list(self.block_shape)} for this spec, got {list(block.shape)}")
        if block.dtype != self.torch_dtype:
            raise ValueError(
                f"block dtype must be {self.dtype}, got {dtype_name(block.dtype) if block.dtype in DTYPE_NAMES else block.dtype}"
            )
