"""Triton kernel for block-sparse causal prefill over a :class:`~sparse_attn.patterns.PrefillPlan`.

A program is (query block of 64 rows, query head). Vertical-slash plans (A-shape included) run
two phases folded into one online softmax: the key blocks a slash line crosses, masked to
``j <= i & diag[i - j] & ~col[j]``, then the vertical columns gathered 64 at a time, masked to
``j <= i`` — so every allowed pair counts once and the columns cost no more than their number.
Block-mask plans visit their listed key blocks with the causal mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, finalize_softmax, online_softmax_step

BLOCK = 64


@triton.jit
def _block_sparse_prefill_kernel(
    Q,
    K,
    V,
    O,
    L,
    COLM,
    DIAGM,
    VIDX,
    VCNT,
    DELTAS,
    BIDS,
    num_tokens,
    num_qblocks,
    group_size,
    num_vidx,
    num_deltas,
    num_bids,
    scale,
    s_qh,
    s_qt,
    s_kh,
    s_kt,
    s_vh,
    s_vt,
    s_oh,
    s_ot,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_BLOCK_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)  # query blocks on axis 0: CUDA allows 2^31 - 1 there, 65535 on axes 1-2
    h = tl.program_id(1)
    hk = h // group_size
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < num_tokens
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(Q + h * s_qh + rows.to(tl.int64)[:, None] * s_qt + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0).to(
        tl.float32
    )  # [M, D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    h64 = h.to(tl.int64)

    if IS_BLOCK_MASK:
        for j in range(0, num_bids):
            kb = tl.load(BIDS + (h64 * num_qblocks + qb) * num_bids + j)
            if kb >= 0:
                cols = kb * BLOCK_M + tl.arange(0, BLOCK_M)
                cmask = cols < num_tokens
                kv_mask = cmask[:, None] & dmask[None, :]
                k = tl.load(K + hk * s_kh + cols.to(tl.int64)[:, None] * s_kt + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
                v = tl.load(V + hk * s_vh + cols.to(tl.int64)[:, None] * s_vt + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
                ok = (rows[:, None] >= cols[None, :]) & cmask[None, :]
                s = tl.where(ok, s, float("-inf"))
                m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)
    else:
        for j in range(0, num_deltas):
            delta = tl.load(DELTAS + h64 * num_deltas + j)
            kb = qb - delta
            if (delta >= 0) & (kb >= 0):
                cols = kb * BLOCK_M + tl.arange(0, BLOCK_M)
                cmask = cols < num_tokens
                kv_mask = cmask[:, None] & dmask[None, :]
                k = tl.load(K + hk * s_kh + cols.to(tl.int64)[:, None] * s_kt + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
                v = tl.load(V + hk * s_vh + cols.to(tl.int64)[:, None] * s_vt + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
                causal = (rows[:, None] >= cols[None, :]) & cmask[None, :] & rmask[:, None]
                diag = tl.load(DIAGM + h64 * num_tokens + (rows[:, None] - cols[None, :]), mask=causal, other=0)
                col = tl.load(COLM + h64 * num_tokens + cols, mask=cmask, other=1)
                s = tl.where(causal & (diag != 0) & (col == 0)[None, :], s, float("-inf"))
                m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)
        num_cols = tl.load(VCNT + h64 * num_qblocks + qb)
        for t0 in range(0, num_cols, BLOCK_M):
            pos = t0 + tl.arange(0, BLOCK_M)
            pmask = pos < num_cols
            cols = tl.load(VIDX + h64 * num_vidx + pos, mask=pmask, other=0)
            kv_mask = pmask[:, None] & dmask[None, :]
            k = tl.load(K + hk * s_kh + cols.to(tl.int64)[:, None] * s_kt + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(V + hk * s_vh + cols.to(tl.int64)[:, None] * s_vt + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            s = tl.where(pmask[None, :] & (rows[:, None] >= cols[None, :]), s, float("-inf"))
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    o, lse = finalize_softmax(m_i, l_i, acc)
    tl.store(O + h * s_oh + rows.to(tl.int64)[:, None] * s_ot + d[None, :], o.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(L + h64 * num_tokens + rows, lse, mask=rmask)


def block_sparse_prefill_plan_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, scale: float):
    """``q [H_q, T, D]``, ``k, v [H_kv, T, D]`` -> ``(o [H_q, T, D] like q, lse [H_q, T] float32)``."""
    H_q, T, D = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty((H_q, T), dtype=torch.float32, device=q.device)
    if T == 0 or H_q == 0:
        return o, lse
    nqb = triton.cdiv(T, BLOCK)
    if plan.is_block_mask:
        bids = plan.block_ids.contiguous()
        colm = diagm = vidx = vcnt = deltas = bids
        num_vidx = num_deltas = 0
        num_bids = bids.shape[-1]
    else:
        colm = plan.col_mask.to(torch.int8).contiguous()
        diagm = plan.diag_mask.to(torch.int8).contiguous()
        vidx, vcnt, deltas = plan.vertical.contiguous(), plan.vertical_count.contiguous(), plan.deltas.contiguous()
        bids = deltas
        num_vidx, num_deltas, num_bids = vidx.shape[-1], deltas.shape[-1], 0
    _block_sparse_prefill_kernel[(nqb, H_q)](
        q,
        k,
        v,
        o,
        lse,
        colm,
        diagm,
        vidx,
        vcnt,
        deltas,
        bids,
        T,
        nqb,
        H_q // k.shape[0],
        num_vidx,
        num_deltas,
        num_bids,
        float(scale),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        o.stride(0),
        o.stride(1),
        HEAD_DIM=D,
        BLOCK_M=BLOCK,
        BLOCK_D=triton.next_power_of_2(D),
        IS_BLOCK_MASK=plan.is_block_mask,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return o, lse
