"""Sparse decode: each KV head attends only the tokens it selected (flash-decoding over them).

Two cache layouts:
  - contiguous: ``k, v [B, H_kv, T, D]`` (HND, one sequence per row of the batch);
  - paged: the store's block layout, a pool ``kv_blocks [N, L, 2, H_kv, P, D]`` of blocks
    (layer-major, K then V) and a ``block_table [B, max_blocks]`` mapping each sequence's
    ``i``-th block of ``P`` tokens to a pool row.

``indices [B, H_kv, K]`` are token positions in the sequence, per KV head (GQA: the query heads
``h*G .. h*G+G-1`` of group ``h`` share KV head ``h``'s selection), ``-1`` for padding.
``indices=None`` attends every token ``[0, lengths[b])`` (dense decode through the same code).
"""

from __future__ import annotations

import torch

from kvtier.checks import check_int

from . import _validate as V
from ._torch import chunk_tokens, chunked_states
from .registry import ATTENTION_TOLERANCES, KernelEntry, get_kernel, register

if V.HAS_TRITON:
    from .kernels.attend import attend_partials, merge_partials
else:  # pragma: no cover
    attend_partials = merge_partials = None  # type: ignore[assignment]  # CUDA tensors need Triton; CPU ones run torch


# ----------------------------------------------------------------------------- references


def _reference_states(q, k_sel, v_sel, valid, scale):
    """float32 attention of ``q [B, H_kv, G, D]`` over ``k_sel, v_sel [B, H_kv, K, D]``."""
    s = torch.einsum("bhgd,bhkd->bhgk", q.double(), k_sel.double()) * scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    o = torch.einsum("bhgk,bhkd->bhgd", p, v_sel.double())
    return o.float(), lse.float()


def sparse_decode_reference(q, k, v, indices=None, lengths=None, scale=None, split_tokens=None):
    """float64-accumulated, float32-output reference of :func:`sparse_decode` (materializes everything)."""
    B, H_q, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    scale = V.resolve_scale(scale, D)
    lengths = torch.full((B,), T, device=q.device) if lengths is None else lengths.to(q.device)
    if indices is None:
        indices = torch.arange(T, device=q.device).expand(B, H_kv, T)
        indices = torch.where(indices < lengths.view(-1, 1, 1), indices, -1)
    valid = indices >= 0
    idx = indices.clamp_min(0).long()[..., None].expand(-1, -1, -1, D)
    k_sel = torch.gather(k.float(), 2, idx)
    v_sel = torch.gather(v.float(), 2, idx)
    o, lse = _reference_states(q.float().view(B, H_kv, H_q // H_kv, D), k_sel, v_sel, valid, scale)
    return o.view(B, H_q, D), lse.view(B, H_q)


def paged_to_contiguous(kv_blocks, block_table, layer, num_tokens):
    """``(k, v) [B, H_kv, num_tokens, D]`` gathered from the pool through the block table."""
    P = kv_blocks.shape[4]
    num_blocks = -(-num_tokens // P)
    table = block_table[:, :num_blocks].clamp_min(0).long()  # [B, nb]
    B = table.shape[0]
    out = []
    for kv in (0, 1):
        pool = kv_blocks[:, layer, kv]  # [N, H_kv, P, D]
        x = pool[table]  # [B, nb, H_kv, P, D]
        x = x.permute(0, 2, 1, 3, 4).reshape(B, pool.shape[1], num_blocks * P, pool.shape[3])
        out.append(x[:, :, :num_tokens])
    return out[0], out[1]


def sparse_decode_paged_reference(q, kv_blocks, block_table, indices=None, lengths=None, layer=0, scale=None, split_tokens=None):
    """Reference of :func:`sparse_decode_paged`: gather the blocks into a contiguous cache first."""
    P = kv_blocks.shape[4]
    T = block_table.shape[1] * P if lengths is None else max(int(lengths.max()) if lengths.numel() else 0, 1)
    k, v = paged_to_contiguous(kv_blocks, block_table, layer, T)
    return sparse_decode_reference(q, k, v, indices, lengths, scale)


# ----------------------------------------------------------------------------- torch paths


def _rows(x: torch.Tensor, D: int) -> torch.Tensor:
    """``x [B, H, T, D]`` as ``[B*H*T, D]`` rows (a copy only if x is not contiguous)."""
    return x.reshape(-1, D)


def _decode_torch(q, num_kv_heads, num_keys, gather_rows, scale, split_tokens):
    B, H_q, D = q.shape
    G = H_q // num_kv_heads
    qf = q.float().view(B, num_kv_heads, G, D)  # [B, H_kv, G, D]
    chunk = chunk_tokens(B * num_kv_heads * D, split_tokens)
    o, lse = chunked_states(qf, num_keys, chunk, gather_rows, scale)
    return o.view(B, H_q, D).to(q.dtype), lse.view(B, H_q)


def sparse_decode_torch(q, k, v, indices=None, lengths=None, scale=None, split_tokens=None):
    B, H_q, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    scale = V.resolve_scale(scale, D)
    if indices is None:
        lens = None if lengths is None else lengths.to(q.device).view(B, 1, 1)

        def gather(lo, hi):
            valid = None
            if lens is not None:
                valid = (torch.arange(lo, hi, device=q.device).view(1, 1, -1) < lens).expand(B, H_kv, -1)
            return k[:, :, lo:hi].float(), v[:, :, lo:hi].float(), valid

        num_keys = T if lengths is None else min(T, int(lengths.max()) if B else 0)
        return _decode_torch(q, H_kv, num_keys, gather, scale, split_tokens)

    base = (torch.arange(B, device=q.device).view(-1, 1, 1) * H_kv + torch.arange(H_kv, device=q.device).view(1, -1, 1)) * T

    def gather(lo, hi):  # whole rows of D: index_select on [B*H_kv*T, D] rows, much faster than torch.gather
        idx = indices[:, :, lo:hi]
        valid = idx >= 0
        rows = (idx.clamp_min(0) + base).flatten()
        shape = (*idx.shape, D)
        return _rows(k, D).index_select(0, rows).view(shape).float(), _rows(v, D).index_select(0, rows).view(shape).float(), valid

    return _decode_torch(q, H_kv, indices.shape[-1], gather, scale, split_tokens)


def sparse_decode_paged_torch(q, kv_blocks, block_table, indices=None, lengths=None, layer=0, scale=None, split_tokens=None):
    B, H_q, D = q.shape
    H_kv, P = kv_blocks.shape[3], kv_blocks.shape[4]
    scale = V.resolve_scale(scale, D)
    k_pool, v_pool = kv_blocks[:, layer, 0], kv_blocks[:, layer, 1]  # [N, H_kv, P, D]
    heads = torch.arange(H_kv, device=q.device).view(1, -1, 1)
    table = block_table.long()

    L = kv_blocks.shape[1]
    flat = kv_blocks.view(-1, D) if kv_blocks.is_contiguous() else None

    def read(tok, valid):
        tok = torch.where(valid, tok, 0)
        phys = torch.gather(table, 1, (tok // P).reshape(B, -1)).view(tok.shape).clamp_min(0)
        off = tok % P
        if flat is None:
            return k_pool[phys, heads, off].float(), v_pool[phys, heads, off].float()  # [B, H_kv, C, D]
        # row of (block, layer, K/V, head, offset) in the pool seen as [N*L*2*H_kv*P, D]
        row_k = (((phys * L + layer) * 2) * H_kv + heads) * P + off
        shape = (*tok.shape, D)
        return (
            flat.index_select(0, row_k.flatten()).view(shape).float(),
            flat.index_select(0, (row_k + H_kv * P).flatten()).view(shape).float(),
        )

    if indices is None:
        lens = torch.full((B,), table.shape[1] * P, device=q.device) if lengths is None else lengths.to(q.device)

        def gather(lo, hi):
            tok = torch.arange(lo, hi, device=q.device).view(1, 1, -1).expand(B, H_kv, -1)
            valid = tok < lens.view(B, 1, 1)
            return (*read(tok, valid), valid)

        num_keys = int(lens.max()) if B else 0
        return _decode_torch(q, H_kv, num_keys, gather, scale, split_tokens)

    def gather(lo, hi):
        tok = indices[:, :, lo:hi].long()
        valid = tok >= 0
        return (*read(tok, valid), valid)

    return _decode_torch(q, H_kv, indices.shape[-1], gather, scale, split_tokens)


# ----------------------------------------------------------------------------- Triton launchers


def _nodes_per_sequence(B, device):
    ar = torch.arange(B + 1, dtype=torch.int32, device=device)
    return ar, ar[:B]


def sparse_decode_triton(q, k, v, indices=None, lengths=None, scale=None, split_tokens=None):
    B, H_q, D = q.shape
    T = k.shape[2]
    scale = V.resolve_scale(scale, D)
    if indices is None and lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int32, device=q.device)
    node_start, seq_order = _nodes_per_sequence(B, q.device)
    o, lse = attend_partials(
        q,
        k,
        v,
        scale=scale,
        node_start=node_start,
        seq_order=seq_order,
        lengths=None if lengths is None else lengths.to(torch.int32),
        indices=indices,
        split_tokens=split_tokens,
    )
    return merge_partials(o, lse, q.dtype)


def sparse_decode_paged_triton(q, kv_blocks, block_table, indices=None, lengths=None, layer=0, scale=None, split_tokens=None):
    B, H_q, D = q.shape
    P = kv_blocks.shape[4]
    scale = V.resolve_scale(scale, D)
    if indices is None and lengths is None:
        lengths = torch.full((B,), block_table.shape[1] * P, dtype=torch.int32, device=q.device)
    node_start, seq_order = _nodes_per_sequence(B, q.device)
    o, lse = attend_partials(
        q,
        kv_blocks[:, layer, 0],
        kv_blocks[:, layer, 1],
        scale=scale,
        node_start=node_start,
        seq_order=seq_order,
        lengths=None if lengths is None else lengths.to(torch.int32),
        indices=indices,
        block_table=block_table,
        block_tokens=P,
        split_tokens=split_tokens,
    )
    return merge_partials(o, lse, q.dtype)


# ----------------------------------------------------------------------------- public API


def _check_q(q):
    V.check_tensor("q", q, ["B", "H_q", "D"], V.FLOAT_DTYPES)
    return q.shape


def _check_indices_arg(indices, B, H_kv, lengths, device, check):
    if indices is None:
        return
    V.check_tensor("indices", indices, ["B", "H_kv", "K"], V.INDEX_DTYPES, device)
    V.check_size("indices", indices, 0, "B", B)
    V.check_size("indices", indices, 1, "H_kv", H_kv)
    if check:
        V.check_indices(indices, lengths)


def sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    split_tokens: int | None = None,
    backend: V.Backend = "auto",
    check_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the tokens each KV head selected, from a contiguous cache.

    Args:
        q: ``[B, H_q, D]`` float16, bfloat16 or float32 — one query per sequence and head.
        k, v: ``[B, H_kv, T, D]``, q's dtype and device — the cache (``H_q`` a multiple of ``H_kv``).
        indices: ``[B, H_kv, K]`` int32/int64 — token ids in ``[0, lengths[b])`` per KV head, or
            ``-1`` (padding, ignored anywhere in the row). ``K = 0`` or a row of ``-1`` is an empty
            selection: ``o = 0, lse = -inf``. Duplicated ids count twice. ``None``: all tokens.
        lengths: ``[B]`` int32/int64 in ``[0, T]`` — valid tokens per sequence (default ``T``).
        scale: score scale (default ``1/sqrt(D)``).
        split_tokens: keys per split/chunk (default: Triton picks enough splits to fill the GPU;
            torch picks chunks of bounded memory). Changes rounding only.
        backend: ``"auto"`` (Triton for CUDA tensors, chunked torch otherwise), ``"triton"``, ``"torch"``.
        check_indices: verify every index lies in range (one device sync); turn off only when the
            caller guarantees it — an out-of-range index reads out of bounds in the Triton kernel.

    Returns:
        ``(o [B, H_q, D] in q's dtype, lse [B, H_q] float32)`` with natural-log ``lse``, ready for
        :func:`merge_states` with attention over other keys.

    Example:
        >>> q, k, v = torch.randn(1, 4, 64), torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
        >>> o, lse = sparse_decode(q, k, v, torch.arange(100).expand(1, 2, 100))
        >>> dense = torch.nn.functional.scaled_dot_product_attention(
        ...     q[:, :, None], k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))[:, :, 0]
        >>> torch.allclose(o, dense, atol=1e-5)
        True
    """
    B, H_q, D = _check_q(q)
    V.check_tensor("k", k, ["B", "H_kv", "T", "D"], V.FLOAT_DTYPES, q.device)
    V.check_same_dtype("k", k, q.dtype, "q")
    V.check_size("k", k, 0, "B", B)
    V.check_size("k", k, 3, "D", D)
    V.check_tensor("v", v, ["B", "H_kv", "T", "D"], V.FLOAT_DTYPES, q.device)
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    V.check_same_dtype("v", v, q.dtype, "q")
    H_kv, T = k.shape[1], k.shape[2]
    V.check_gqa(H_q, H_kv)
    V.resolve_scale(scale, D)
    V.check_split_tokens(split_tokens)
    lens = V.check_lengths("lengths", lengths, B, T, q.device)
    _check_indices_arg(indices, B, H_kv, lens, q.device, check_indices)
    impl = get_kernel("sparse_decode").impl(V.pick_backend(backend, q.device))
    return impl(q, k, v, indices, lengths, scale, split_tokens)


def sparse_decode_paged(
    q: torch.Tensor,
    kv_blocks: torch.Tensor,
    block_table: torch.Tensor,
    indices: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    *,
    layer: int = 0,
    scale: float | None = None,
    split_tokens: int | None = None,
    backend: V.Backend = "auto",
    check_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparse_decode` reading KV where the store keeps it: blocks through a block table.

    Args:
        q: ``[B, H_q, D]`` float16, bfloat16 or float32.
        kv_blocks: ``[N, L, 2, H_kv, P, D]``, q's dtype — a pool of ``N`` blocks in the store's block
            layout ``[num_layers, 2 (K, V), num_kv_heads, block_tokens, head_dim]`` (any strides
            over the first dims, e.g. a view of a slot pool; the last dim contiguous).
        block_table: ``[B, max_blocks]`` int32/int64 — pool rows of each sequence's blocks in order;
            entries past a sequence's last block are ignored (``-1`` by convention).
        indices: ``[B, H_kv, K]`` token ids in ``[0, lengths[b])`` or ``-1``; ``None``: all tokens.
        lengths: ``[B]`` tokens per sequence, in ``[0, max_blocks * P]`` (default: full table).
        layer: which layer of the blocks to read, in ``[0, L)``.
        scale, split_tokens, backend, check_indices: as :func:`sparse_decode`.

    Returns:
        ``(o [B, H_q, D] in q's dtype, lse [B, H_q] float32)``.
    """
    B, H_q, D = _check_q(q)
    V.check_tensor("kv_blocks", kv_blocks, ["N", "L", "2", "H_kv", "P", "D"], V.FLOAT_DTYPES, q.device)
    V.check_same_dtype("kv_blocks", kv_blocks, q.dtype, "q")
    V.check_size("kv_blocks", kv_blocks, 2, "K and V", 2)
    V.check_size("kv_blocks", kv_blocks, 5, "D", D)
    N, L, _, H_kv, P, _ = kv_blocks.shape
    V.check_gqa(H_q, H_kv)
    check_int("layer", layer, low=0, high=L - 1)
    V.check_tensor("block_table", block_table, ["B", "max_blocks"], V.INDEX_DTYPES, q.device)
    V.check_size("block_table", block_table, 0, "B", B)
    V.resolve_scale(scale, D)
    V.check_split_tokens(split_tokens)
    max_tokens = block_table.shape[1] * P
    lens = V.check_lengths("lengths", lengths, B, max_tokens, q.device)
    if B and block_table.shape[1]:
        used = torch.arange(block_table.shape[1], device=q.device).view(1, -1) * P < lens.view(-1, 1)
        bad = used & ((block_table < 0) | (block_table >= N))
        if bool(bad.any()):
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"block_table entries of used blocks must lie in [0, {N}) (rows of kv_blocks), "
                f"got {int(block_table[b, j])} at [{b}, {j}] (lengths[{b}] = {int(lens[b])}, P = {P})"
            )
    _check_indices_arg(indices, B, H_kv, lens, q.device, check_indices)
    impl = get_kernel("sparse_decode_paged").impl(V.pick_backend(backend, q.device))
    return impl(q, kv_blocks, block_table, indices, lengths, layer, scale, split_tokens)


register(
    KernelEntry(
        "sparse_decode", sparse_decode_reference, sparse_decode_torch, sparse_decode_triton if V.HAS_TRITON else None, ATTENTION_TOLERANCES
    )
)
register(
    KernelEntry(
        "sparse_decode_paged",
        sparse_decode_paged_reference,
        sparse_decode_paged_torch,
        sparse_decode_paged_triton if V.HAS_TRITON else None,
        ATTENTION_TOLERANCES,
    )
)
