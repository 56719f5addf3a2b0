"""Prefill sparsity patterns (MInference's three), their builders, and the plan kernels run.

A pattern says, per query head, which keys ``j <= i`` query ``i`` attends (causality always
applies on top):
  - :class:`AShape`: the first ``sink_tokens`` keys and a local window of ``window_tokens``
    (offsets ``0 <= i - j < window_tokens``) — StreamingLLM's shape, the same for every head;
  - :class:`VerticalSlash`: vertical columns (token ids every query attends) and slash lines
    (offsets ``i - j``), per head — MInference estimates both from the last 64 queries
    (:func:`vertical_slash_pattern`);
  - :class:`BlockMask`: 64x64 blocks of (query block, key block), per head — estimated from
    mean-pooled query and key blocks (:func:`block_sparse_pattern`).

Kernels do not read patterns directly: :func:`build_plan` turns one into a :class:`PrefillPlan`
(A-shape is the vertical-slash plan with columns ``[0, sink)`` and offsets ``[0, window)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from kvtier.checks import check_int

from . import _validate as V

BLOCK = 64  # the prefill tile: 64 queries x 64 keys


@dataclass(frozen=True)
class AShape:
    """Sinks plus a local window. ``window_tokens`` counts the diagonal (``1`` = only itself)."""

    sink_tokens: int
    window_tokens: int

    def __post_init__(self) -> None:
        for name in ("sink_tokens", "window_tokens"):
            check_int(f"AShape.{name}", getattr(self, name), low=0)


@dataclass(frozen=True)
class VerticalSlash:
    """Per query head: ``vertical [H_q, NV]`` token ids and ``slash [H_q, NS]`` offsets ``i - j``
    (int32/int64, ``-1`` = padding; duplicates are harmless)."""

    vertical: torch.Tensor
    slash: torch.Tensor


@dataclass(frozen=True)
class BlockMask:
    """``mask [H_q, ceil(T/64), ceil(T/64)]`` bool: query block ``qb`` attends key block ``kb``.
    Blocks above the diagonal are ignored (causality)."""

    mask: torch.Tensor


Pattern = Union[AShape, VerticalSlash, BlockMask]


def check_pattern(pattern: object, num_q_heads: int, num_tokens: int, device: torch.device) -> None:
    """ValueError unless ``pattern`` fits ``H_q`` heads and ``T`` tokens on ``device``."""
    if isinstance(pattern, AShape):
        return
    if isinstance(pattern, VerticalSlash):
        for name, t in (("vertical", pattern.vertical), ("slash", pattern.slash)):
            V.check_tensor(f"pattern.{name}", t, ["H_q", "N" + name[0].upper()], V.INDEX_DTYPES, device)
            V.check_size(f"pattern.{name}", t, 0, "H_q", num_q_heads)
            if t.numel() and (int(t.min()) < -1 or int(t.max()) >= num_tokens):
                raise ValueError(
                    f"pattern.{name} must hold -1 (padding) or values in [0, {num_tokens}) (T), "
                    f"got values in [{int(t.min())}, {int(t.max())}]"
                )
        return
    if isinstance(pattern, BlockMask):
        nb = -(-num_tokens // BLOCK)
        V.check_tensor("pattern.mask", pattern.mask, ["H_q", "T/64", "T/64"], (torch.bool,), device)
        if tuple(pattern.mask.shape) != (num_q_heads, nb, nb):
            raise ValueError(
                f"pattern.mask must have shape [H_q, ceil(T/64), ceil(T/64)] = {[num_q_heads, nb, nb]}, got {list(pattern.mask.shape)}"
            )
        return
    raise ValueError(f"pattern must be an AShape, VerticalSlash or BlockMask, got {type(pattern).__name__}")


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PrefillPlan:
    """What the kernels read (all int32 or bool on the device of q; ``nQB = ceil(T/64)``).

    Vertical-slash kind (``is_block_mask = False``):
      - ``col_mask [H_q, T]`` bool: the vertical columns; ``diag_mask [H_q, T]`` bool: the slash offsets;
      - ``vertical [H_q, NV]``: the columns sorted ascending (padding ``T``), ``vertical_count
        [H_q, nQB]`` how many of them a query block can see (``<= its last row``);
      - ``deltas [H_q, ND]``: block distances ``qb - kb`` that any slash reaches (``-1`` padding);
        the kernel visits key blocks ``qb - delta`` with mask ``diag & ~col``, then the gathered
        columns with mask ``j <= i``: every allowed pair is counted exactly once.
    Block-mask kind: ``block_ids [H_q, nQB, NB]`` the key blocks of each query block (``-1`` padding).
    """

    num_tokens: int
    is_block_mask: bool
    col_mask: torch.Tensor | None = None
    diag_mask: torch.Tensor | None = None
    vertical: torch.Tensor | None = None
    vertical_count: torch.Tensor | None = None
    deltas: torch.Tensor | None = None
    block_ids: torch.Tensor | None = None
    block_mask: torch.Tensor | None = None


def _sorted_members(mask: torch.Tensor, pad: int) -> torch.Tensor:
    """``mask [..., n]`` bool -> ``[..., max count]`` int32 of the set positions ascending, ``pad`` after.

    Works from ``nonzero()`` (memory proportional to the set entries, not to ``mask.numel()``).
    """
    lead = mask.shape[:-1]
    flat = mask.reshape(-1, mask.shape[-1])
    counts = flat.sum(-1)
    width = int(counts.max()) if flat.numel() else 0
    out = torch.full((flat.shape[0], width), pad, dtype=torch.int32, device=mask.device)
    row, col = flat.nonzero(as_tuple=True)  # row-major: ascending within a row
    if row.numel():
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(row.numel(), device=mask.device) - starts[row]
        out[row, pos] = col.to(torch.int32)
    return out.view(*lead, width)


def build_plan(pattern: Pattern, num_q_heads: int, num_tokens: int, device: torch.device) -> PrefillPlan:
    H, T = num_q_heads, num_tokens
    nqb = -(-T // BLOCK)
    if isinstance(pattern, BlockMask):
        causal = torch.ones(nqb, nqb, dtype=torch.bool, device=device).tril()
        mask = pattern.mask & causal
        return PrefillPlan(T, True, block_ids=_sorted_members(mask, -1), block_mask=mask)
    col = torch.zeros(H, T, dtype=torch.bool, device=device)
    diag = torch.zeros(H, T, dtype=torch.bool, device=device)
    if isinstance(pattern, AShape):
        col[:, : min(pattern.sink_tokens, T)] = True
        diag[:, : min(pattern.window_tokens, T)] = True
    else:
        for dst, ids in ((col, pattern.vertical), (diag, pattern.slash)):
            ids = ids.long()
            valid = ids >= 0
            rows = torch.arange(H, device=device).view(-1, 1).expand_as(ids)
            dst[rows[valid], ids[valid]] = True
    vertical = _sorted_members(col, T)  # [H, NV]
    last_row = (torch.arange(nqb, device=device) * BLOCK + BLOCK - 1).clamp_max(T - 1)
    vertical_count = torch.searchsorted(vertical.contiguous(), last_row.to(torch.int32).expand(H, -1).contiguous(), right=True).to(
        torch.int32
    )
    # A slash at offset d crosses key blocks qb - floor(d/64) and qb - ceil(d/64) of query block qb.
    reach = torch.zeros(H, nqb + 1, dtype=torch.bool, device=device)  # a distance of nqb reaches no block
    head, offset = diag.nonzero(as_tuple=True)
    reach[head, offset // BLOCK] = True
    reach[head, (offset + BLOCK - 1) // BLOCK] = True
    deltas = _sorted_members(reach[:, :nqb], -1)
    return PrefillPlan(T, False, col_mask=col, diag_mask=diag, vertical=vertical, vertical_count=vertical_count, deltas=deltas)


def dense_mask(pattern: Pattern, num_q_heads: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """``[H_q, T, T]`` bool: the pattern as a dense causal mask (for references and tests only)."""
    H, T = num_q_heads, num_tokens
    i = torch.arange(T, device=device).view(-1, 1)
    j = torch.arange(T, device=device).view(1, -1)
    causal = (j <= i).expand(H, T, T)
    if isinstance(pattern, AShape):
        return causal & ((j < pattern.sink_tokens) | (i - j < pattern.window_tokens))
    if isinstance(pattern, BlockMask):
        m = pattern.mask
        return causal & m[:, (i // BLOCK).expand(T, T), (j // BLOCK).expand(T, T)]
    out = torch.zeros(H, T, T, dtype=torch.bool, device=device)
    for h in range(H):
        cols = pattern.vertical[h][pattern.vertical[h] >= 0].long()
        offs = pattern.slash[h][pattern.slash[h] >= 0].long()
        out[h][:, cols] = True
        out[h] |= torch.isin(i - j, offs)
    return causal & out


def allowed(plan: PrefillPlan, h: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` bool: whether query ``rows[r]`` of head ``h`` attends key ``cols[c]`` under the plan."""
    causal = rows.view(-1, 1) >= cols.view(1, -1)
    if plan.is_block_mask:
        assert plan.block_mask is not None  # the block-mask kind has one
        return causal & plan.block_mask[h][(rows // BLOCK).view(-1, 1), (cols // BLOCK).view(1, -1)]
    off = (rows.view(-1, 1) - cols.view(1, -1)).clamp_min(0)
    assert plan.diag_mask is not None and plan.col_mask is not None  # the vertical-slash kind has them
    return causal & (plan.diag_mask[h][off] | plan.col_mask[h][cols].view(1, -1))


# ----------------------------------------------------------------------------- builders


def _check_qk(q, k):
    V.check_tensor("q", q, ["H_q", "T", "D"], V.FLOAT_DTYPES)
    V.check_tensor("k", k, ["H_kv", "T", "D"], V.FLOAT_DTYPES, q.device)
    V.check_size("k", k, 1, "T", q.shape[1])
    V.check_size("k", k, 2, "D", q.shape[2])
    return V.check_gqa(q.shape[0], k.shape[0])


def _check_count(name, value):
    check_int(name, value, low=0)


def vertical_slash_pattern(
    q: torch.Tensor,
    k: torch.Tensor,
    num_vertical: int,
    num_slash: int,
    *,
    last_q: int = 64,
    sink_tokens: int = 30,
    window_tokens: int = 100,
    scale: float | None = None,
    chunk_tokens: int | None = None,
) -> VerticalSlash:
    """MInference's vertical-slash estimate from the last ``last_q`` queries.

    The last queries attend all keys (causal among themselves); per head, the attention summed
    over those queries per column ranks the vertical lines, and summed per diagonal (offset
    ``i - j``) ranks the slash lines. The first ``sink_tokens`` columns and the first
    ``window_tokens`` offsets are always kept (as MInference does with 30 and 100).

    Args:
        q: ``[H_q, T, D]``; k: ``[H_kv, T, D]`` (float16/bfloat16/float32, one device).
        num_vertical, num_slash: how many columns and offsets to keep per head (capped at ``T``).
        chunk_tokens: keys per chunk of the estimate (default: bounded memory).

    Returns:
        :class:`VerticalSlash` with ``vertical [H_q, min(num_vertical, T)]`` and ``slash [H_q, min(num_slash, T)]``.
    """
    G = _check_qk(q, k)
    for name, value in (
        ("num_vertical", num_vertical),
        ("num_slash", num_slash),
        ("sink_tokens", sink_tokens),
        ("window_tokens", window_tokens),
    ):
        _check_count(name, value)
    check_int("last_q", last_q, low=1)
    H_q, T, D = q.shape
    H_kv = k.shape[0]
    scale = V.resolve_scale(scale, D)
    n = min(last_q, T)
    rows = torch.arange(T - n, T, device=q.device)
    qr = q[:, T - n :].float().reshape(H_kv, G * n, D)  # [H_kv, G*n, D]
    chunk = chunk_tokens or max(BLOCK, (1 << 22) // max(H_q * n, 1))

    def scores(lo, hi):
        s = torch.matmul(qr, k[:, lo:hi].float().transpose(1, 2)).mul_(scale).view(H_q, n, hi - lo)
        cols = torch.arange(lo, hi, device=q.device)
        return s.masked_fill_(cols.view(1, 1, -1) > rows.view(1, -1, 1), float("-inf")), cols

    lse = torch.full((H_q, n), float("-inf"), device=q.device)
    for lo in range(0, T, chunk):
        lse = torch.logaddexp(lse, torch.logsumexp(scores(lo, min(lo + chunk, T))[0], -1))
    col_mass = torch.zeros(H_q, T, device=q.device)
    diag_mass = torch.zeros(H_q, T, device=q.device)
    for lo in range(0, T, chunk):
        s, cols = scores(lo, min(lo + chunk, T))
        p = torch.exp(s - lse.unsqueeze(-1))  # [H_q, n, C]
        col_mass[:, lo : lo + cols.numel()] = p.sum(1)
        off = (rows.view(-1, 1) - cols.view(1, -1)).clamp_min(0).expand(H_q, -1, -1)
        diag_mass.scatter_add_(1, off.reshape(H_q, -1), p.reshape(H_q, -1))
    col_mass[:, :sink_tokens] = float("inf")
    diag_mass[:, :window_tokens] = float("inf")
    vertical = col_mass.topk(min(num_vertical, T), -1).indices.sort(-1).values
    slash = diag_mass.topk(min(num_slash, T), -1).indices.sort(-1).values
    return VerticalSlash(vertical.to(torch.int32), slash.to(torch.int32))


def block_sparse_pattern(
    q: torch.Tensor,
    k: torch.Tensor,
    num_blocks: int,
    *,
    scale: float | None = None,
) -> BlockMask:
    """A 64x64 block mask from mean-pooled query and key blocks.

    Per head, each query block keeps the ``num_blocks`` key blocks (at or before it) whose
    pooled key scores highest against its pooled query, plus always the first block (sinks) and
    its own diagonal block.

    Args:
        q: ``[H_q, T, D]``; k: ``[H_kv, T, D]``.
        num_blocks: key blocks kept per query block (besides the forced two).

    Returns:
        :class:`BlockMask` with ``mask [H_q, ceil(T/64), ceil(T/64)]`` bool (``H_q * (T/64)^2`` bytes).
    """
    G = _check_qk(q, k)
    _check_count("num_blocks", num_blocks)
    H_q, T, D = q.shape
    scale = V.resolve_scale(scale, D)
    nb = -(-T // BLOCK)
    pad = nb * BLOCK - T
    count = torch.full((nb,), float(BLOCK), device=q.device)
    count[-1] = BLOCK - pad

    def pool(x):
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
        return x.view(x.shape[0], nb, BLOCK, D).sum(2) / count.view(1, -1, 1)

    qp = pool(q)  # [H_q, nb, D]
    kp = pool(k).repeat_interleave(G, 0)  # [H_q, nb, D]
    mask = torch.zeros(H_q, nb, nb, dtype=torch.bool, device=q.device)
    rows_per_chunk = max(1, (1 << 22) // max(H_q * nb, 1))
    causal_all = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
    keep = min(num_blocks, nb)
    for r0 in range(0, nb, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, nb)
        s = torch.matmul(qp[:, r0:r1], kp.transpose(1, 2)) * scale  # [H_q, r, nb]
        s.masked_fill_(~causal_all[r0:r1], float("-inf"))
        if keep:
            top = s.topk(keep, -1)
            mask[:, r0:r1].scatter_(-1, top.indices, ~torch.isneginf(top.values))
    ar = torch.arange(nb, device=q.device)
    mask[:, ar, ar] = True
    mask[:, :, 0] = True
    return BlockMask(mask)


def attention_mass_covered(
    q: torch.Tensor,
    k: torch.Tensor,
    pattern: Pattern,
    *,
    rows: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_tokens: int = 8192,
) -> float:
    """Mean over heads and query ``rows`` (default: all) of the causal softmax mass the pattern keeps.

    Computed in key chunks (two passes), so memory is bounded by ``len(rows) x chunk_tokens``
    per head.
    """
    G = _check_qk(q, k)
    H_q, T, D = q.shape
    check_pattern(pattern, H_q, T, q.device)
    scale = V.resolve_scale(scale, D)
    plan = build_plan(pattern, H_q, T, q.device)
    rows = torch.arange(T, device=q.device) if rows is None else rows.to(q.device).long()
    total = 0.0
    for h in range(H_q):
        qh, kh = q[h, rows].float(), k[h // G]
        last = int(rows.max()) + 1
        lse = torch.full((rows.numel(),), float("-inf"), device=q.device)
        kept = torch.zeros(rows.numel(), device=q.device)
        for phase in (0, 1):
            for lo in range(0, last, chunk_tokens):
                cols = torch.arange(lo, min(lo + chunk_tokens, last), device=q.device)
                s = (qh @ kh[cols].float().T) * scale
                s.masked_fill_(cols.view(1, -1) > rows.view(-1, 1), float("-inf"))
                if phase == 0:
                    lse = torch.logaddexp(lse, torch.logsumexp(s, -1))
                else:
                    p = torch.exp(s - lse.view(-1, 1))
                    kept += torch.where(allowed(plan, h, rows, cols), p, 0.0).sum(-1)
        total += float(kept.mean())
    return total / H_q
