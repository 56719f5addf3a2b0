"""Sparse attention: Triton kernels, their float32 torch references, and the dispatching API.

CUDA tensors run the Triton kernels; CPU tensors run chunked torch code whose memory is bounded
however long the cache (set ``TRITON_INTERPRET=1`` before importing to run the Triton kernels
on CPU, as the tests do). Every kernel is registered in :mod:`sparse_attn.registry` with its
reference and tolerance. All ``lse`` are natural-log.
"""

from .cascade import KVLevel, cascade_decode, shared_prefix_decode
from .decode import sparse_decode, sparse_decode_paged
from .merge import merge_states, merge_states_n
from .patterns import (
    AShape,
    BlockMask,
    VerticalSlash,
    attention_mass_covered,
    block_sparse_pattern,
    vertical_slash_pattern,
)
from .prefill import block_sparse_prefill, dense_prefill_torch
from .registry import KERNELS, available_kernels, get_kernel

__all__ = [
    "AShape",
    "BlockMask",
    "KERNELS",
    "KVLevel",
    "VerticalSlash",
    "attention_mass_covered",
    "available_kernels",
    "block_sparse_pattern",
    "block_sparse_prefill",
    "cascade_decode",
    "dense_prefill_torch",
    "get_kernel",
    "merge_states",
    "merge_states_n",
    "shared_prefix_decode",
    "sparse_decode",
    "sparse_decode_paged",
    "vertical_slash_pattern",
]
