"""Triton kernel for decode-style attention: a few query rows against a set of keys, split over
programs (flash-decoding), then merged by log-sum-exp.

One kernel serves every decode path:
  - sparse decode: one *node* per sequence, the keys of each KV head given by ``indices``
    (``-1`` = padding), read from a contiguous cache or through a block table (paged);
  - dense decode: the same without indices (tokens ``[0, lengths[node])``);
  - Hydragen / cascade levels: a node is a shared prefix; the queries of every sequence attached
    to it are gathered into the rows of one matrix product, so the prefix is read once per
    row block instead of once per sequence.

A program is ``(node, kv head)`` x row block x split. Rows are ``(sequence, query head of the
group)`` pairs; a split is a contiguous range of key positions (``per_split`` of them, whole
tiles). Each program writes a float32 partial state ``(o, lse)``; the launcher merges the splits
with :func:`merge_states_n_triton`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import block_dim, dot_precision, finalize_softmax, online_softmax_step, split_length
from .merge import merge_states_n_triton

BLOCK_N = 32  # keys per tile


@triton.jit
def _attend_kernel(
    Q,
    K,
    V,
    IDX,
    BT,
    LEN,
    SEQ_ORDER,
    NODE_START,
    O,
    L,
    scale,
    num_kv_heads,
    group_size,
    per_split,
    block_tokens,
    num_indices,
    s_qb,
    s_qh,
    s_kn,
    s_kh,
    s_kt,
    s_vn,
    s_vh,
    s_vt,
    s_in,
    s_ih,
    s_bt,
    s_os,
    s_ob,
    s_oh,
    s_ls,
    s_lb,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_INDICES: tl.constexpr,
    PAGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    row_block = tl.program_id(1)
    split = tl.program_id(2)
    node = pid // num_kv_heads
    h = pid % num_kv_heads
    seq_lo = tl.load(NODE_START + node)
    seq_hi = tl.load(NODE_START + node + 1)
    first = seq_lo + row_block * BLOCK_S
    if first < seq_hi:
        rows = tl.arange(0, BLOCK_M)
        slot = first + rows // group_size
        row_ok = (rows < BLOCK_S * group_size) & (slot < seq_hi)
        seq = tl.load(SEQ_ORDER + slot, mask=row_ok, other=0).to(tl.int64)
        qh = h * group_size + rows % group_size
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        q = tl.load(Q + seq[:, None] * s_qb + qh[:, None] * s_qh + d[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0).to(
            tl.float32
        )  # [M, D]

        if HAS_INDICES:
            num_keys = num_indices
        else:
            num_keys = tl.load(LEN + node)
        start = split * per_split
        stop = tl.minimum(start + per_split, num_keys)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        node64 = node.to(tl.int64)
        for t0 in range(start, stop, BLOCK_N):
            pos = t0 + tl.arange(0, BLOCK_N)
            kmask = pos < stop
            if HAS_INDICES:
                tok = tl.load(IDX + node64 * s_in + h * s_ih + pos, mask=kmask, other=-1)
                kmask = kmask & (tok >= 0)
                tok = tl.where(kmask, tok, 0).to(tl.int64)
            else:
                tok = pos.to(tl.int64)
            if PAGED:
                phys = tl.load(BT + node64 * s_bt + tok // block_tokens, mask=kmask, other=0).to(tl.int64)
                off = tok % block_tokens
                k_row = phys * s_kn + off * s_kt
                v_row = phys * s_vn + off * s_vt
            else:
                k_row = node64 * s_kn + tok * s_kt
                v_row = node64 * s_vn + tok * s_vt
            tile_mask = kmask[:, None] & dmask[None, :]
            k = tl.load(K + k_row[:, None] + h * s_kh + d[None, :], mask=tile_mask, other=0.0).to(tl.float32)  # [N, D]
            v = tl.load(V + v_row[:, None] + h * s_vh + d[None, :], mask=tile_mask, other=0.0).to(tl.float32)  # [N, D]
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [M, N]
            s = tl.where(kmask[None, :], s, float("-inf"))
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

        o, lse = finalize_softmax(m_i, l_i, acc)
        tl.store(O + split * s_os + seq[:, None] * s_ob + qh[:, None] * s_oh + d[None, :], o, mask=row_ok[:, None] & dmask[None, :])
        tl.store(L + split * s_ls + seq * s_lb + qh, lse, mask=row_ok)


def attend_partials(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    node_start: torch.Tensor,
    seq_order: torch.Tensor,
    lengths: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    block_tokens: int = 1,
    split_tokens: int | None = None,
    rows_per_program: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`_attend_kernel`; return float32 partial states ``(o [S, B, H_q, D], lse [S, B, H_q])``.

    ``q [B, H_q, D]``. Contiguous keys: ``k, v [N, H_kv, T, D]``. Paged keys: ``k, v [N_blocks,
    H_kv, P, D]`` (any strides on the first three dims) with ``block_table [N, max_blocks]``.
    Node ``n`` holds the sequences ``seq_order[node_start[n]:node_start[n+1]]`` and the keys
    ``indices[n, h]`` (if given) or ``[0, lengths[n])``. Sequences on no node keep ``(0, -inf)``.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_nodes = node_start.numel() - 1
    num_kv_heads = k.shape[1]
    group_size = num_q_heads // num_kv_heads
    if indices is not None:
        max_keys = indices.shape[-1]
    else:
        assert lengths is not None, "attend_partials needs indices or lengths"
        max_keys = int(lengths.max()) if num_nodes else 0
    num_splits, per_split = split_length(max_keys, num_nodes * num_kv_heads, q.device, split_tokens, BLOCK_N)
    o = torch.zeros((num_splits, num_seqs, num_q_heads, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.full((num_splits, num_seqs, num_q_heads), float("-inf"), dtype=torch.float32, device=q.device)
    if num_nodes == 0 or num_seqs == 0 or max_keys == 0:
        return o, lse
    counts = node_start[1:] - node_start[:-1]
    num_row_blocks = triton.cdiv(int(counts.max()), rows_per_program)
    if num_row_blocks == 0:
        return o, lse
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    dummy = node_start
    idx = indices if indices is not None else dummy
    if indices is not None and indices.stride(-1) != 1:
        idx = indices.contiguous()
    bt = block_table if block_table is not None else dummy
    length = lengths if lengths is not None else dummy
    grid = (num_nodes * num_kv_heads, num_row_blocks, num_splits)
    _attend_kernel[grid](
        q,
        k,
        v,
        idx,
        bt,
        length,
        seq_order,
        node_start,
        o,
        lse,
        float(scale),
        num_kv_heads,
        group_size,
        per_split,
        block_tokens,
        max_keys,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        idx.stride(0) if indices is not None else 0,
        idx.stride(1) if indices is not None else 0,
        bt.stride(0) if block_table is not None else 0,
        o.stride(0),
        o.stride(1),
        o.stride(2),
        lse.stride(0),
        lse.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_S=rows_per_program,
        BLOCK_M=block_dim(rows_per_program * group_size),
        BLOCK_N=BLOCK_N,
        BLOCK_D=triton.next_power_of_2(head_dim),
        HAS_INDICES=indices is not None,
        PAGED=block_table is not None,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return o, lse


def merge_partials(o: torch.Tensor, lse: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``o [S, *, D]`` float32, ``lse [S, *]`` -> ``(o [*, D] out_dtype, lse [*])``."""
    if o.shape[0] == 1:
        return o[0].to(out_dtype), lse[0]
    return merge_states_n_triton(o, lse, out_dtype=out_dtype)
