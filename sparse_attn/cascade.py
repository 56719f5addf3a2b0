"""Shared-prefix decode (Hydragen) and its tree form (cascade).

When a batch of ``B`` sequences shares a prefix, decode attention splits by keys: every
sequence's queries against the shared prefix — one matrix product ``[B*G, D] x [D, T_prefix]``
per KV head, so the prefix is read once for the whole batch instead of ``B`` times — and each
sequence against its own suffix; the two states merge by log-sum-exp. A tree of prefixes (a
system prompt shared by all, documents shared by some, then per-sequence suffixes) is the same
decomposition repeated: one :class:`KVLevel` per depth, each sequence attached to at most one
node per level, and all the levels' states merged at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import _validate as V
from ._torch import chunk_tokens, chunked_states
from .decode import sparse_decode_torch
from .merge import merge_states_n_torch
from .registry import ATTENTION_TOLERANCES, KernelEntry, get_kernel, register

if V.HAS_TRITON:
    from .kernels.attend import attend_partials, merge_partials
else:  # pragma: no cover
    attend_partials = merge_partials = None  # type: ignore[assignment]  # CUDA tensors need Triton; CPU ones run torch

# Query rows (sequences x query heads of a group) one Triton program multiplies against a node's keys.
ROWS_PER_PROGRAM = 64


@dataclass(frozen=True)
class KVLevel:
    """One depth of a prefix tree: ``N`` nodes of KV and which node each sequence attends.

    Attributes:
        k, v: ``[N, H_kv, T, D]`` — node ``n``'s tokens ``[0, lengths[n])``.
        lengths: ``[N]`` int32/int64 in ``[0, T]``; ``None``: all ``T``.
        seq_to_node: ``[B]`` int32/int64 in ``[-1, N)`` (``-1``: the sequence has no node at this
            level); ``None``: sequence ``b`` attends node ``b`` (per-sequence suffixes, ``N = B``).
    """

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor | None = None
    seq_to_node: torch.Tensor | None = None


# ----------------------------------------------------------------------------- reference


def cascade_decode_reference(q, levels, scale=None, split_tokens=None):
    """float64-accumulated reference: each sequence attends the concatenation of its nodes' keys."""
    B, H_q, D = q.shape
    scale = V.resolve_scale(scale, D)
    o = torch.zeros(B, H_q, D)
    lse = torch.full((B, H_q), float("-inf"))
    for b in range(B):
        ks, vs = [], []
        for lvl in levels:
            n = b if lvl.seq_to_node is None else int(lvl.seq_to_node[b])
            if n < 0:
                continue
            t = lvl.k.shape[2] if lvl.lengths is None else int(lvl.lengths[n])
            ks.append(lvl.k[n, :, :t].double().cpu())
            vs.append(lvl.v[n, :, :t].double().cpu())
        k = torch.cat(ks, 1) if ks else torch.zeros(levels[0].k.shape[1], 0, D, dtype=torch.float64)
        v = torch.cat(vs, 1) if vs else k
        H_kv = k.shape[0]
        qb = q[b].double().cpu().view(H_kv, H_q // H_kv, D)
        s = torch.einsum("hgd,htd->hgt", qb, k) * scale
        l = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isneginf(l), 0.0, l).unsqueeze(-1))
        o[b] = torch.einsum("hgt,htd->hgd", p, v).reshape(H_q, D).float()
        lse[b] = l.reshape(H_q).float()
    return o.to(q.device), lse.to(q.device)


# ----------------------------------------------------------------------------- torch path


def _shared_level_torch(q32, lvl, scale, split_tokens):
    """States of every sequence against its node at a shared level (one matmul per node)."""
    B, H_q, D = q32.shape
    N, H_kv, T, _ = lvl.k.shape
    G = H_q // H_kv
    o = torch.zeros(B, H_q, D, device=q32.device)
    lse = torch.full((B, H_q), float("-inf"), device=q32.device)
    for n in range(N):
        seqs = (lvl.seq_to_node == n).nonzero().flatten()
        t = T if lvl.lengths is None else int(lvl.lengths[n])
        if seqs.numel() == 0 or t == 0:
            continue
        S = seqs.numel()
        rows = q32[seqs].view(S, H_kv, G, D).permute(1, 0, 2, 3).reshape(H_kv, S * G, D)  # [H_kv, S*G, D]
        k_n, v_n = lvl.k[n], lvl.v[n]  # [H_kv, T, D]
        chunk = chunk_tokens(max(H_kv * D, H_kv * S * G), split_tokens)
        o_n, lse_n = chunked_states(rows, t, chunk, lambda lo, hi: (k_n[:, lo:hi].float(), v_n[:, lo:hi].float(), None), scale)
        o[seqs] = o_n.view(H_kv, S, G, D).permute(1, 0, 2, 3).reshape(S, H_q, D)
        lse[seqs] = lse_n.view(H_kv, S, G).permute(1, 0, 2).reshape(S, H_q)
    return o, lse


def cascade_decode_torch(q, levels, scale=None, split_tokens=None):
    B, H_q, D = q.shape
    scale = V.resolve_scale(scale, D)
    q32 = q.float()
    os_, lses = [], []
    for lvl in levels:
        if lvl.seq_to_node is None:
            o, lse = sparse_decode_torch(q32, lvl.k, lvl.v, None, lvl.lengths, scale, split_tokens)
        else:
            o, lse = _shared_level_torch(q32, lvl, scale, split_tokens)
        os_.append(o)
        lses.append(lse)
    o, lse = merge_states_n_torch(torch.stack(os_), torch.stack(lses))
    return o.to(q.dtype), lse


# ----------------------------------------------------------------------------- Triton path


def _level_nodes(lvl, B, device):
    """``(node_start [N+1], seq_order [B'])``: sequences grouped by node, for the kernel."""
    N = lvl.k.shape[0]
    if lvl.seq_to_node is None:
        ar = torch.arange(B + 1, dtype=torch.int32, device=device)
        return ar, ar[:B]
    s2n = lvl.seq_to_node.long()
    order = torch.argsort(s2n, stable=True)
    order = order[s2n[order] >= 0].to(torch.int32)
    counts = torch.bincount(s2n[s2n >= 0], minlength=N)
    node_start = torch.zeros(N + 1, dtype=torch.int32, device=device)
    node_start[1:] = torch.cumsum(counts, 0)
    return node_start, order


def cascade_decode_triton(q, levels, scale=None, split_tokens=None):
    B, H_q, D = q.shape
    scale = V.resolve_scale(scale, D)
    os_, lses = [], []
    for lvl in levels:
        N, H_kv, T, _ = lvl.k.shape
        G = H_q // H_kv
        node_start, order = _level_nodes(lvl, B, q.device)
        rows = 1 if lvl.seq_to_node is None else max(1, ROWS_PER_PROGRAM // G)
        lengths = lvl.lengths
        if lengths is None:
            lengths = torch.full((N,), T, dtype=torch.int32, device=q.device)
        o, lse = attend_partials(
            q,
            lvl.k,
            lvl.v,
            scale=scale,
            node_start=node_start,
            seq_order=order,
            lengths=lengths.to(torch.int32),
            split_tokens=split_tokens,
            rows_per_program=rows,
        )
        os_.append(o)
        lses.append(lse)
    return merge_partials(torch.cat(os_), torch.cat(lses), q.dtype)


# ----------------------------------------------------------------------------- public API


def _check_levels(q, levels):
    B, H_q, D = q.shape
    if not isinstance(levels, (list, tuple)) or not levels or not all(isinstance(l, KVLevel) for l in levels):
        raise ValueError(f"levels must be a non-empty list of KVLevel, got {type(levels).__name__} {levels!r:.80}")
    H_kv = None
    for i, lvl in enumerate(levels):
        V.check_tensor(f"levels[{i}].k", lvl.k, ["N", "H_kv", "T", "D"], V.FLOAT_DTYPES, q.device)
        V.check_tensor(f"levels[{i}].v", lvl.v, ["N", "H_kv", "T", "D"], V.FLOAT_DTYPES, q.device)
        V.check_same_dtype(f"levels[{i}].k", lvl.k, q.dtype, "q")
        V.check_same_dtype(f"levels[{i}].v", lvl.v, q.dtype, "q")
        if lvl.v.shape != lvl.k.shape:
            raise ValueError(f"levels[{i}].v must have the shape of levels[{i}].k {list(lvl.k.shape)}, got {list(lvl.v.shape)}")
        N, h, T, d = lvl.k.shape
        V.check_size(f"levels[{i}].k", lvl.k, 3, "D", D)
        if H_kv is None:
            H_kv = h
            V.check_gqa(H_q, H_kv)
        V.check_size(f"levels[{i}].k", lvl.k, 1, "H_kv (as levels[0])", H_kv)
        V.check_lengths(f"levels[{i}].lengths", lvl.lengths, N, T, q.device)
        if lvl.seq_to_node is None:
            if N != B:
                raise ValueError(f"levels[{i}] has no seq_to_node, so it needs one node per sequence (N = B = {B}), got N = {N}")
        else:
            V.check_tensor(f"levels[{i}].seq_to_node", lvl.seq_to_node, ["B"], V.INDEX_DTYPES, q.device)
            V.check_size(f"levels[{i}].seq_to_node", lvl.seq_to_node, 0, "B", B)
            if B and (int(lvl.seq_to_node.min()) < -1 or int(lvl.seq_to_node.max()) >= N):
                raise ValueError(
                    f"levels[{i}].seq_to_node must lie in [-1, {N}), got values in "
                    f"[{int(lvl.seq_to_node.min())}, {int(lvl.seq_to_node.max())}]"
                )


def cascade_decode(
    q: torch.Tensor,
    levels: Sequence[KVLevel],
    *,
    scale: float | None = None,
    split_tokens: int | None = None,
    backend: V.Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over a tree of shared prefixes (Hydragen repeated per level).

    Args:
        q: ``[B, H_q, D]`` float16, bfloat16 or float32.
        levels: :class:`KVLevel` s, e.g. ``[system prompt (N=1), documents (N=#docs), suffixes
            (seq_to_node=None)]``; all with q's dtype, device, ``D`` and one ``H_kv``.
        scale, split_tokens, backend: as :func:`sparse_decode`.

    Returns:
        ``(o [B, H_q, D] in q's dtype, lse [B, H_q] float32)``: attention of each sequence over
        the concatenation of its nodes' tokens (``(0, -inf)`` for a sequence with no tokens).
    """
    V.check_tensor("q", q, ["B", "H_q", "D"], V.FLOAT_DTYPES)
    _check_levels(q, levels)
    V.resolve_scale(scale, q.shape[2])
    V.check_split_tokens(split_tokens)
    impl = get_kernel("cascade_decode").impl(V.pick_backend(backend, q.device))
    return impl(q, list(levels), scale, split_tokens)


def shared_prefix_decode(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor | None = None,
    suffix_v: torch.Tensor | None = None,
    *,
    prefix_lengths: torch.Tensor | None = None,
    suffix_lengths: torch.Tensor | None = None,
    seq_to_prefix: torch.Tensor | None = None,
    scale: float | None = None,
    split_tokens: int | None = None,
    backend: V.Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hydragen decode: a batch against a shared prefix (one matmul) plus per-sequence suffixes.

    Args:
        q: ``[B, H_q, D]`` float16, bfloat16 or float32.
        prefix_k, prefix_v: ``[H_kv, T_p, D]`` — one prefix shared by the whole batch; or
            ``[N_p, H_kv, T_p, D]`` with ``seq_to_prefix`` — several prefixes.
        suffix_k, suffix_v: ``[B, H_kv, T_s, D]`` or ``None`` — each sequence's own tokens.
        prefix_lengths: ``[N_p]`` valid prefix tokens (default ``T_p``).
        suffix_lengths: ``[B]`` valid suffix tokens (default ``T_s``).
        seq_to_prefix: ``[B]`` in ``[-1, N_p)``: the prefix each sequence continues (required
            with 4-dim prefixes unless ``N_p = 1``).
        scale, split_tokens, backend: as :func:`sparse_decode`.

    Returns:
        ``(o [B, H_q, D] in q's dtype, lse [B, H_q] float32)`` — attention over prefix + suffix.

    Example:
        >>> q, pk, pv = torch.randn(3, 4, 64), torch.randn(2, 50, 64), torch.randn(2, 50, 64)
        >>> sk, sv = torch.randn(3, 2, 7, 64), torch.randn(3, 2, 7, 64)
        >>> o, lse = shared_prefix_decode(q, pk, pv, sk, sv)
        >>> k, v = torch.cat([pk.expand(3, -1, -1, -1), sk], 2), torch.cat([pv.expand(3, -1, -1, -1), sv], 2)
        >>> torch.allclose(o, sparse_decode(q, k, v)[0], atol=1e-5)
        True
    """
    V.check_tensor("q", q, ["B", "H_q", "D"], V.FLOAT_DTYPES)
    B = q.shape[0]
    if isinstance(prefix_k, torch.Tensor) and prefix_k.dim() == 3:
        prefix_k = prefix_k.unsqueeze(0)
        prefix_v = prefix_v.unsqueeze(0) if isinstance(prefix_v, torch.Tensor) else prefix_v
    V.check_tensor("prefix_k", prefix_k, ["N_p", "H_kv", "T_p", "D"], V.FLOAT_DTYPES, q.device)
    if seq_to_prefix is None:
        if prefix_k.shape[0] != 1:
            raise ValueError(f"seq_to_prefix [B] is required with {prefix_k.shape[0]} prefixes (prefix_k.shape[0] != 1)")
        seq_to_prefix = torch.zeros(B, dtype=torch.int64, device=q.device)
    levels = [KVLevel(prefix_k, prefix_v, prefix_lengths, seq_to_prefix)]
    if (suffix_k is None) != (suffix_v is None):
        raise ValueError(f"suffix_k and suffix_v go together, got suffix_k={type(suffix_k).__name__}, suffix_v={type(suffix_v).__name__}")
    if suffix_k is not None:
        levels.append(KVLevel(suffix_k, suffix_v, suffix_lengths, None))
    return cascade_decode(q, levels, scale=scale, split_tokens=split_tokens, backend=backend)


register(
    KernelEntry(
        "cascade_decode",
        cascade_decode_reference,
        cascade_decode_torch,
        cascade_decode_triton if V.HAS_TRITON else None,
        ATTENTION_TOLERANCES,
    )
)
