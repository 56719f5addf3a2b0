"""Block-sparse causal prefill: A-shape, vertical-slash and 64x64 block-mask patterns.

``q [H_q, T, D]`` and ``k, v [H_kv, T, D]`` are one sequence's prefill (HND, as the store's
blocks); query head ``h`` reads KV head ``h // (H_q / H_kv)``. The pattern is per query head
(see :mod:`sparse_attn.patterns`); dense causal attention under the same mask is the reference.
"""

from __future__ import annotations

import torch

from . import _validate as V
from ._torch import CHUNK_ELEMENTS
from .merge import merge_pair
from .patterns import BLOCK, Pattern, PrefillPlan, build_plan, check_pattern, dense_mask
from .registry import ATTENTION_TOLERANCES, KernelEntry, get_kernel, register

if V.HAS_TRITON:
    from .kernels.prefill import block_sparse_prefill_plan_triton
else:  # pragma: no cover
    block_sparse_prefill_plan_triton = None  # type: ignore[assignment]  # the registry entry has no Triton path

# Query rows per step of the torch path (a multiple of the 64-row block).
QUERY_CHUNK = 128


# ----------------------------------------------------------------------------- reference


def block_sparse_prefill_reference(q, k, v, pattern, scale=None):
    """float64-accumulated reference: dense attention under the pattern's dense causal mask.
    Rows the pattern leaves empty get ``o = 0``."""
    H_q, T, D = q.shape
    scale = V.resolve_scale(scale, D)
    G = H_q // k.shape[0]
    mask = dense_mask(pattern, H_q, T, q.device)
    kk = k.double().repeat_interleave(G, 0)
    vv = v.double().repeat_interleave(G, 0)
    s = torch.einsum("htd,hsd->hts", q.double(), kk) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    return torch.einsum("hts,hsd->htd", p, vv).float()


# ----------------------------------------------------------------------------- torch path


def _masked_state(q, k, v, mask, scale):
    """State of rows ``q [M, D]`` over ``k, v [C, D]`` (float32) under ``mask [M, C]``."""
    s = (q @ k.T).mul_(scale).masked_fill_(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp_(s.sub_(torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1)))
    return p @ v, lse


def _rows_keys(plan: PrefillPlan, h: int, r0: int, r1: int, device):
    """Keys query rows ``[r0, r1)`` of head ``h`` may attend under the plan, and ``mask(lo, hi)``:
    the ``[R, hi - lo]`` bool mask of those keys ``cols[lo:hi]`` (built per key chunk, so memory
    stays bounded even for a dense pattern)."""
    rows = torch.arange(r0, r1, device=device).view(-1, 1)
    qb0, qb1 = r0 // BLOCK, (r1 - 1) // BLOCK
    tile = torch.arange(BLOCK, device=device)
    if plan.is_block_mask:
        assert plan.block_ids is not None and plan.block_mask is not None  # the block-mask kind has them
        ids = plan.block_ids[h, qb0 : qb1 + 1].flatten()
        kbs = torch.unique(ids[ids >= 0].long())
        cols = (kbs.view(-1, 1) * BLOCK + tile).flatten()
        cols = cols[cols < r1]
        row_blocks = plan.block_mask[h][(rows // BLOCK).flatten()]  # [R, nKB]

        def block_mask(lo, hi):
            c = cols[lo:hi].view(1, -1)
            return (rows >= c) & row_blocks[:, c[0] // BLOCK]

        return cols, block_mask
    assert plan.deltas is not None and plan.vertical is not None and plan.vertical_count is not None
    assert plan.diag_mask is not None and plan.col_mask is not None  # the vertical-slash kind has them
    deltas = plan.deltas[h]
    deltas = deltas[deltas >= 0].long()
    kbs = (torch.arange(qb0, qb1 + 1, device=device).view(-1, 1) - deltas.view(1, -1)).flatten()
    kbs = torch.unique(kbs[kbs >= 0])
    band = (kbs.view(-1, 1) * BLOCK + tile).flatten()
    band = band[band < r1]
    vcols = plan.vertical[h, : int(plan.vertical_count[h, qb1])].long()
    cols = torch.cat([band, vcols])
    n_band = band.numel()
    diag, col = plan.diag_mask[h], plan.col_mask[h]

    def vs_mask(lo, hi):
        parts = []
        if lo < n_band:  # slash blocks: the offset is a slash and the key is no vertical column
            c = band[lo : min(hi, n_band)].view(1, -1)
            off = rows - c
            parts.append((off >= 0) & diag[off.clamp_min(0)] & ~col[c])
        if hi > n_band:  # gathered vertical columns
            parts.append(rows >= vcols[max(lo, n_band) - n_band : hi - n_band].view(1, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    return cols, vs_mask


def block_sparse_prefill_plan_torch(q, k, v, plan: PrefillPlan, scale: float, query_chunk: int = QUERY_CHUNK):
    """``(o [H_q, T, D] like q, lse [H_q, T] float32)``; memory: one query chunk x a bounded key chunk."""
    H_q, T, D = q.shape
    G = H_q // k.shape[0]
    o = torch.empty_like(q)
    lse = torch.empty((H_q, T), dtype=torch.float32, device=q.device)
    for h in range(H_q):
        kh, vh = k[h // G], v[h // G]
        for r0 in range(0, T, query_chunk):
            r1 = min(r0 + query_chunk, T)
            qr = q[h, r0:r1].float()
            cols, mask = _rows_keys(plan, h, r0, r1, q.device)
            key_chunk = max(BLOCK, CHUNK_ELEMENTS // max(r1 - r0, D))
            acc = torch.zeros(r1 - r0, D, device=q.device)
            acc_lse = torch.full((r1 - r0,), float("-inf"), device=q.device)
            for c0 in range(0, cols.numel(), key_chunk):
                c1 = min(c0 + key_chunk, cols.numel())
                c = cols[c0:c1]
                state = _masked_state(qr, kh[c].float(), vh[c].float(), mask(c0, c1), scale)
                acc, acc_lse = merge_pair(acc, acc_lse, *state)
            o[h, r0:r1] = acc.to(q.dtype)
            lse[h, r0:r1] = acc_lse
    return o, lse


def block_sparse_prefill_torch(q, k, v, pattern, scale=None):
    plan = build_plan(pattern, q.shape[0], q.shape[1], q.device)
    return block_sparse_prefill_plan_torch(q, k, v, plan, V.resolve_scale(scale, q.shape[2]))[0]


def block_sparse_prefill_triton(q, k, v, pattern, scale=None):
    plan = build_plan(pattern, q.shape[0], q.shape[1], q.device)
    return block_sparse_prefill_plan_triton(q, k, v, plan, V.resolve_scale(scale, q.shape[2]))[0]


def dense_prefill_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, query_chunk: int = QUERY_CHUNK
) -> torch.Tensor:
    """Dense causal prefill in the same chunked torch style (the benchmarks' dense baseline).

    ``q [H_q, T, D]``, ``k, v [H_kv, T, D]`` -> ``o [H_q, T, D]``; keys are read up to each query
    chunk's last row only (causality), in key chunks of bounded size.
    """
    H_q, T, D = q.shape
    H_kv = k.shape[0]
    G = H_q // H_kv
    scale = V.resolve_scale(scale, D)
    o = torch.empty_like(q)
    for r0 in range(0, T, query_chunk):
        r1 = min(r0 + query_chunk, T)
        rows = torch.arange(r0, r1, device=q.device)
        qr = q[:, r0:r1].float().reshape(H_kv, G * (r1 - r0), D)
        key_chunk = max(BLOCK, CHUNK_ELEMENTS // (H_q * (r1 - r0)))
        acc = torch.zeros(H_kv, G * (r1 - r0), D, device=q.device)
        acc_lse = torch.full((H_kv, G * (r1 - r0)), float("-inf"), device=q.device)
        for c0 in range(0, r1, key_chunk):
            c1 = min(c0 + key_chunk, r1)
            s = torch.matmul(qr, k[:, c0:c1].float().transpose(1, 2)).mul_(scale)  # [H_kv, G*R, C]
            causal = (torch.arange(c0, c1, device=q.device).view(1, -1) <= rows.view(-1, 1)).repeat(G, 1)
            s.masked_fill_(~causal, float("-inf"))
            l = torch.logsumexp(s, -1)
            p = torch.exp_(s.sub_(torch.where(torch.isneginf(l), 0.0, l).unsqueeze(-1)))
            acc, acc_lse = merge_pair(acc, acc_lse, torch.matmul(p, v[:, c0:c1].float()), l)
        o[:, r0:r1] = acc.view(H_q, r1 - r0, D).to(q.dtype)
    return o


# ----------------------------------------------------------------------------- public API


def block_sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = None,
    backend: V.Backend = "auto",
) -> torch.Tensor:
    """Causal prefill attention restricted to a sparse pattern.

    Args:
        q: ``[H_q, T, D]`` float16, bfloat16 or float32 — one sequence's queries.
        k, v: ``[H_kv, T, D]``, q's dtype and device (``H_q`` a multiple of ``H_kv``).
        pattern: :class:`~sparse_attn.patterns.AShape`, :class:`~sparse_attn.patterns.VerticalSlash`
            (``[H_q, NV]`` columns, ``[H_q, NS]`` offsets) or :class:`~sparse_attn.patterns.BlockMask`
            (``[H_q, ceil(T/64), ceil(T/64)]`` bool), on q's device.
        scale: score scale (default ``1/sqrt(D)``).
        backend: ``"auto"`` (Triton for CUDA tensors, chunked torch otherwise), ``"triton"``, ``"torch"``.

    Returns:
        ``o [H_q, T, D]`` in q's dtype: row ``i`` of head ``h`` attends the keys ``j <= i`` the
        pattern allows; a row with none gets zeros.

    Example:
        >>> q, k, v = torch.randn(2, 200, 64), torch.randn(1, 200, 64), torch.randn(1, 200, 64)
        >>> o = block_sparse_prefill(q, k, v, AShape(sink_tokens=200, window_tokens=200))
        >>> dense = torch.nn.functional.scaled_dot_product_attention(q, k.expand(2, -1, -1), v.expand(2, -1, -1), is_causal=True)
        >>> torch.allclose(o, dense, atol=1e-5)
        True
    """
    V.check_tensor("q", q, ["H_q", "T", "D"], V.FLOAT_DTYPES)
    H_q, T, D = q.shape
    for name, t in (("k", k), ("v", v)):
        V.check_tensor(name, t, ["H_kv", "T", "D"], V.FLOAT_DTYPES, q.device)
        V.check_same_dtype(name, t, q.dtype, "q")
        V.check_size(name, t, 1, "T", T)
        V.check_size(name, t, 2, "D", D)
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    V.check_gqa(H_q, k.shape[0])
    V.resolve_scale(scale, D)
    check_pattern(pattern, H_q, T, q.device)
    return get_kernel("block_sparse_prefill").impl(V.pick_backend(backend, q.device))(q, k, v, pattern, scale)


register(
    KernelEntry(
        "block_sparse_prefill",
        block_sparse_prefill_reference,
        block_sparse_prefill_torch,
        block_sparse_prefill_triton if V.HAS_TRITON else None,
        ATTENTION_TOLERANCES,
    )
)
