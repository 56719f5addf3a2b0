"""Triton kernels for the log-sum-exp merge of attention states (natural log).

A state ``(o, lse)`` is the softmax-weighted mean ``o`` of some values and the log of the sum
of the weights; two states over disjoint key sets merge into the state over their union:
``lse = log(exp(lse_a) + exp(lse_b))``, ``o = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b``.
A state with ``lse = -inf`` (no keys) contributes nothing, whatever its ``o`` holds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 16


@triton.jit
def _merge_states_kernel(OA, LA, OB, LB, O, L, num_rows, head_dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < num_rows
    mask = rmask[:, None] & (cols < head_dim)[None, :]
    offs = rows.to(tl.int64)[:, None] * head_dim + cols[None, :]

    la = tl.load(LA + rows, mask=rmask, other=float("-inf"))
    lb = tl.load(LB + rows, mask=rmask, other=float("-inf"))
    m = tl.maximum(la, lb)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m_safe)
    wb = tl.exp(lb - m_safe)
    den = wa + wb
    den_safe = tl.where(den > 0, den, 1.0)

    oa = tl.load(OA + offs, mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(OB + offs, mask=mask, other=0.0).to(tl.float32)
    num = tl.where(wa[:, None] > 0, oa * wa[:, None], 0.0) + tl.where(wb[:, None] > 0, ob * wb[:, None], 0.0)
    tl.store(O + offs, (num / den_safe[:, None]).to(O.dtype.element_ty), mask=mask)
    tl.store(L + rows, tl.where(den > 0, m_safe + tl.log(den_safe), float("-inf")), mask=rmask)


@triton.jit
def _merge_states_n_kernel(OS, LS, O, L, num_states, num_rows, head_dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < num_rows
    mask = rmask[:, None] & (cols < head_dim)[None, :]
    offs = rows.to(tl.int64)[:, None] * head_dim + cols[None, :]

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_ptrs = LS + rows  # pointers advance by one state per step (64-bit pointer arithmetic)
    for _ in range(0, num_states):
        m = tl.maximum(m, tl.load(l_ptrs, mask=rmask, other=float("-inf")))
        l_ptrs += num_rows
    m_safe = tl.where(m == float("-inf"), 0.0, m)

    den = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    l_ptrs = LS + rows
    o_ptrs = OS + offs
    for _ in range(0, num_states):
        w = tl.exp(tl.load(l_ptrs, mask=rmask, other=float("-inf")) - m_safe)
        o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(w[:, None] > 0, o * w[:, None], 0.0)
        den += w
        l_ptrs += num_rows
        o_ptrs += num_rows * head_dim
    den_safe = tl.where(den > 0, den, 1.0)
    tl.store(O + offs, (acc / den_safe[:, None]).to(O.dtype.element_ty), mask=mask)
    tl.store(L + rows, tl.where(den > 0, m_safe + tl.log(den_safe), float("-inf")), mask=rmask)


def merge_states_triton(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor):
    """``o_* [*, D]``, ``lse_* [*]`` float32 -> ``(o [*, D] like o_a, lse [*] float32)``."""
    head_dim = o_a.shape[-1]
    oa = o_a.reshape(-1, head_dim).contiguous()
    ob = o_b.reshape(-1, head_dim).contiguous()
    la = lse_a.reshape(-1).contiguous()
    lb = lse_b.reshape(-1).contiguous()
    num_rows = oa.shape[0]
    o = torch.empty_like(oa)
    lse = torch.empty_like(la)
    if num_rows:
        grid = (triton.cdiv(num_rows, BLOCK_R),)
        _merge_states_kernel[grid](oa, la, ob, lb, o, lse, num_rows, head_dim, BLOCK_R=BLOCK_R, BLOCK_D=triton.next_power_of_2(head_dim))
    return o.view(o_a.shape), lse.view(lse_a.shape)


def merge_states_n_triton(o: torch.Tensor, lse: torch.Tensor, out_dtype: torch.dtype | None = None):
    """``o [S, *, D]``, ``lse [S, *]`` float32 -> ``(o [*, D], lse [*] float32)``."""
    num_states, head_dim = o.shape[0], o.shape[-1]
    num_rows = lse[0].numel() if num_states else int(torch.Size(lse.shape[1:]).numel())
    os_ = o.reshape(num_states, num_rows, head_dim).contiguous()
    ls = lse.reshape(num_states, num_rows).contiguous()
    out = torch.empty((num_rows, head_dim), dtype=out_dtype or o.dtype, device=o.device)
    out_lse = torch.empty((num_rows,), dtype=torch.float32, device=o.device)
    if num_rows:
        grid = (triton.cdiv(num_rows, BLOCK_R),)
        _merge_states_n_kernel[grid](
            os_, ls, out, out_lse, num_states, num_rows, head_dim, BLOCK_R=BLOCK_R, BLOCK_D=triton.next_power_of_2(head_dim)
        )
    return out.view(o.shape[1:]), out_lse.view(lse.shape[1:])
