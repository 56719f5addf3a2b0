"""Pieces every kernel uses: the online-softmax step, its finalization, launch helpers.

Numerics: loads are converted to float32 in the kernels (Triton's interpreter computes bf16
arithmetic wrongly, and float32 accumulation is what the tolerances assume). For fp16/bf16
inputs the dots run in tf32, which represents fp16 and bf16 values exactly; for float32
inputs they run in full ("ieee") precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one tile of scores ``s [M, N]`` (``-inf`` where masked) and values ``v [N, D]``
    into the running max ``m_i [M]``, sum ``l_i [M]`` and output ``acc [M, D]``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet stays empty
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def finalize_softmax(m_i, l_i, acc):
    """``(o, lse)`` from the running state; an empty row gives ``o = 0, lse = -inf``."""
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log(l_safe), float("-inf"))
    return acc / l_safe[:, None], lse


INTERPRETED = isinstance(finalize_softmax, InterpretedFunction)


MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def block_dim(n: int, minimum: int = 16) -> int:
    """A power of two >= n (and >= 16, the smallest tile ``tl.dot`` accepts)."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def target_programs(device: torch.device) -> int:
    """How many programs keep the device busy (a few waves of SMs; 1 in the interpreter)."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def split_length(num_keys: int, num_rows: int, device: torch.device, split_tokens: int | None, block_n: int) -> tuple[int, int]:
    """``(num_splits, keys per split)`` for flash-decoding over ``num_keys`` keys and
    ``num_rows`` independent (sequence, head) programs."""
    if num_keys <= 0:
        return 1, block_n
    if split_tokens is None:
        splits = max(1, min(triton.cdiv(num_keys, block_n), triton.cdiv(target_programs(device), max(num_rows, 1))))
        per_split = triton.cdiv(num_keys, splits)
    else:
        per_split = split_tokens
    per_split = triton.cdiv(per_split, block_n) * block_n  # whole tiles per split
    while triton.cdiv(num_keys, per_split) > MAX_GRID_YZ:  # splits are grid axis 2
        per_split *= 2
    return triton.cdiv(num_keys, per_split), per_split
