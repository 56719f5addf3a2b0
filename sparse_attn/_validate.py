"""Argument checks shared by the public functions, and the choice of backend.

A caller's mistake is a ``ValueError`` that says what was expected and what came.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

from kvtier.checks import check_int

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # triton is a Linux-only dependency: the torch paths still work without it
    HAS_TRITON = False

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    dims: Sequence[str],
    dtypes: Sequence[torch.dtype],
    device: torch.device | None = None,
) -> torch.Tensor:
    """``t`` is a tensor with ``len(dims)`` dimensions, one of ``dtypes``, on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [{', '.join(dims)}], got {type(t).__name__}")
    if t.dim() != len(dims):
        raise ValueError(f"{name} must have shape [{', '.join(dims)}] ({len(dims)} dims), got {list(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} dtype must be one of ({_names(dtypes)}), got {str(t.dtype).removeprefix('torch.')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of q), got {t.device}")
    return t


def check_size(name: str, t: torch.Tensor, axis: int, axis_name: str, expected: int) -> None:
    if t.shape[axis] != expected:
        raise ValueError(f"{name}.shape[{axis}] ({axis_name}) must be {expected}, got {t.shape[axis]} (shape {list(t.shape)})")


def check_same_dtype(name: str, t: torch.Tensor, expected: torch.dtype, like: str) -> None:
    if t.dtype != expected:
        raise ValueError(
            f"{name} dtype must be {str(expected).removeprefix('torch.')} like {like}, got {str(t.dtype).removeprefix('torch.')}"
        )


def check_gqa(num_q_heads: int, num_kv_heads: int) -> int:
    """Number of query heads per KV head (query heads ``h*G .. h*G+G-1`` share KV head ``h``)."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"H_q ({num_q_heads}) must be a positive multiple of H_kv ({num_kv_heads})")
    return num_q_heads // num_kv_heads


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    # not check_real: this message also says what None means
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None (1/sqrt(D)), got {scale!r}")
    return float(scale)


def check_split_tokens(split_tokens: int | None) -> None:
    if split_tokens is not None:
        check_int("split_tokens (or None)", split_tokens, low=1)


def check_lengths(name: str, lengths: torch.Tensor | None, n: int, max_tokens: int, device: torch.device) -> torch.Tensor:
    """``lengths`` is ``[n]`` ints in ``[0, max_tokens]``; ``None`` means all ``max_tokens``."""
    if lengths is None:
        return torch.full((n,), max_tokens, dtype=torch.int32, device=device)
    check_tensor(name, lengths, ["N" if name != "lengths" else "B"], INDEX_DTYPES, device)
    check_size(name, lengths, 0, "one per sequence" if name == "lengths" else "one per node", n)
    if n and (int(lengths.min()) < 0 or int(lengths.max()) > max_tokens):
        raise ValueError(f"{name} must lie in [0, {max_tokens}], got values in [{int(lengths.min())}, {int(lengths.max())}]")
    return lengths


def check_indices(indices: torch.Tensor, lengths: torch.Tensor) -> None:
    """Every entry of ``indices [B, H_kv, K]`` is -1 (padding) or in ``[0, lengths[b])``."""
    if indices.numel() == 0:
        return
    limit = lengths.to(indices.dtype).view(-1, 1, 1)
    bad = (indices < -1) | (indices >= limit)
    if bool(bad.any()):
        b, h, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"indices must be -1 (padding) or token ids in [0, lengths[b]); got {int(indices[b, h, j])} "
            f"at [{b}, {h}, {j}] where lengths[{b}] = {int(lengths[b])}"
        )


def pick_backend(backend: str, device: torch.device) -> str:
    """``auto``: Triton for CUDA tensors, chunked torch for everything else."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError(
                "backend='triton' on CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 "
                "before sparse_attn is imported (or use backend='torch')"
            )
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"backend='triton' needs CUDA (or CPU under TRITON_INTERPRET=1) tensors, got {device}")
    return backend


def triton_interpreted() -> bool:
    """Whether the Triton kernels were defined under TRITON_INTERPRET=1 (so they run on CPU)."""
    from .kernels.common import INTERPRETED

    return INTERPRETED
