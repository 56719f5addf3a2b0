"""Log-sum-exp merge of attention states: the basis of split-K decoding, Hydragen and cascades.

An attention state over a key set ``S`` is ``(o, lse)`` with ``lse = log(sum_{j in S} exp(s_j))``
(natural log, ``s_j`` the scaled scores) and ``o = sum_j exp(s_j - lse) v_j``. Two states over
disjoint key sets merge into the state over their union, so attention over any partition of the
keys, merged, equals attention over all of them; merging is associative and commutative. The
empty state is ``(0, -inf)`` and is the identity.
"""

from __future__ import annotations

import torch

from . import _validate as V
from .registry import ATTENTION_TOLERANCES, KernelEntry, get_kernel, register

if V.HAS_TRITON:
    from .kernels.merge import merge_states_n_triton, merge_states_triton
else:  # pragma: no cover - Linux CI always has triton
    merge_states_triton = merge_states_n_triton = None  # type: ignore[assignment]  # the registry entry has no Triton path


# ----------------------------------------------------------------------------- references


def merge_states_reference(o_a, lse_a, o_b, lse_b):
    """float32 reference of :func:`merge_states`."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    o = torch.zeros(o_a.shape, dtype=torch.float32, device=o_a.device)
    for o_x, lse_x in ((o_a, lse_a), (o_b, lse_b)):
        w = torch.where(torch.isneginf(lse_x), 0.0, torch.exp(lse_x - lse)).unsqueeze(-1)
        o = o + torch.where(w > 0, w * o_x.float(), 0.0)
    return o, lse


def merge_states_n_reference(o, lse):
    """float32 reference of :func:`merge_states_n`."""
    lse = lse.float()
    lse_all = torch.logsumexp(lse, dim=0)
    w = torch.where(torch.isneginf(lse), 0.0, torch.exp(lse - lse_all)).unsqueeze(-1)  # [S, *, 1]
    return torch.where(w > 0, w * o.float(), 0.0).sum(0), lse_all


# ----------------------------------------------------------------------------- torch paths


def merge_pair(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge two float32 states (the step every chunked torch path folds its chunks with)."""
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isneginf(m), 0.0, m)
    w_a = torch.exp(lse_a - m_safe)
    w_b = torch.exp(lse_b - m_safe)
    den = w_a + w_b
    inv = torch.where(den > 0, 1.0 / den.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    c_a, c_b = (w_a * inv).unsqueeze(-1), (w_b * inv).unsqueeze(-1)
    o = torch.where(c_a > 0, o_a * c_a, 0.0) + torch.where(c_b > 0, o_b * c_b, 0.0)
    return o, m_safe + torch.log(den)


def merge_states_torch(o_a, lse_a, o_b, lse_b):
    o, lse = merge_pair(o_a.float(), lse_a, o_b.float(), lse_b)
    return o.to(o_a.dtype), lse


def merge_states_n_torch(o, lse):
    if o.shape[0] == 0:
        return torch.zeros(o.shape[1:], dtype=o.dtype, device=o.device), torch.full(lse.shape[1:], float("-inf"), device=o.device)
    m = lse.amax(0)
    m_safe = torch.where(torch.isneginf(m), 0.0, m)
    w = torch.exp(lse - m_safe)  # [S, *]
    den = w.sum(0)
    inv = torch.where(den > 0, 1.0 / den.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    c = (w * inv).unsqueeze(-1)
    out = torch.where(c > 0, o.float() * c, 0.0).sum(0)
    return out.to(o.dtype), m_safe + torch.log(den)


# ----------------------------------------------------------------------------- public API


def merge_states(
    o_a: torch.Tensor,
    lse_a: torch.Tensor,
    o_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    backend: V.Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states computed over disjoint key sets.

    Args:
        o_a: ``[*, D]`` float16, bfloat16 or float32 — attention output over key set A
            (any leading shape, e.g. ``[B, H_q, D]``).
        lse_a: ``[*]`` float32 — natural-log sum of exp of A's scaled scores; ``-inf`` if A is empty.
        o_b: ``[*, D]``, same shape and dtype as ``o_a`` — output over key set B.
        lse_b: ``[*]`` float32 — as ``lse_a``, for B.
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"triton"`` or ``"torch"``.

    Returns:
        ``(o, lse)``: ``o [*, D]`` in ``o_a``'s dtype and ``lse [*]`` float32, the state over A ∪ B.
        Where both sides are empty, ``o = 0`` and ``lse = -inf`` (never NaN).

    Example:
        >>> q, k, v = torch.randn(4, 8), torch.randn(10, 8), torch.randn(10, 8)
        >>> def attend(k, v):
        ...     s = q @ k.T
        ...     return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)
        >>> o, lse = merge_states(*attend(k[:3], v[:3]), *attend(k[3:], v[3:]))
        >>> torch.allclose(o, attend(k, v)[0], atol=1e-6)
        True
    """
    if not isinstance(o_a, torch.Tensor):
        raise ValueError(f"o_a must be a torch.Tensor of shape [*, D], got {type(o_a).__name__}")
    if o_a.dim() < 1:
        raise ValueError("o_a must have shape [*, D] (at least 1 dim), got a scalar")
    dims = ["*"] * (o_a.dim() - 1) + ["D"]
    V.check_tensor("o_a", o_a, dims, V.FLOAT_DTYPES)
    V.check_tensor("o_b", o_b, dims, V.FLOAT_DTYPES, o_a.device)
    V.check_same_dtype("o_b", o_b, o_a.dtype, "o_a")
    if o_b.shape != o_a.shape:
        raise ValueError(f"o_b must have the shape of o_a {list(o_a.shape)}, got {list(o_b.shape)}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        V.check_tensor(name, lse, dims[:-1], (torch.float32,), o_a.device)
        if lse.shape != o_a.shape[:-1]:
            raise ValueError(f"{name} must have shape {list(o_a.shape[:-1])} (o_a without D), got {list(lse.shape)}")
    return get_kernel("merge_states").impl(V.pick_backend(backend, o_a.device))(o_a, lse_a, o_b, lse_b)


def merge_states_n(o: torch.Tensor, lse: torch.Tensor, *, backend: V.Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``S`` attention states over pairwise disjoint key sets in one pass.

    Args:
        o: ``[S, *, D]`` float16, bfloat16 or float32 — the states' outputs, stacked on dim 0.
        lse: ``[S, *]`` float32 — their log-sum-exps (natural log; ``-inf`` for an empty state).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(o [*, D] in o's dtype, lse [*] float32)``: equal (up to rounding) to folding
        :func:`merge_states` over the ``S`` states in any order. ``S = 0`` gives the empty state.
    """
    if not isinstance(o, torch.Tensor) or o.dim() < 2:
        raise ValueError(f"o must be a torch.Tensor of shape [S, *, D] (at least 2 dims), got {getattr(o, 'shape', type(o).__name__)}")
    dims = ["S"] + ["*"] * (o.dim() - 2) + ["D"]
    V.check_tensor("o", o, dims, V.FLOAT_DTYPES)
    V.check_tensor("lse", lse, dims[:-1], (torch.float32,), o.device)
    if lse.shape != o.shape[:-1]:
        raise ValueError(f"lse must have shape {list(o.shape[:-1])} (o without D), got {list(lse.shape)}")
    return get_kernel("merge_states_n").impl(V.pick_backend(backend, o.device))(o, lse)


register(KernelEntry("merge_states", merge_states_reference, merge_states_torch, merge_states_triton, ATTENTION_TOLERANCES))
register(KernelEntry("merge_states_n", merge_states_n_reference, merge_states_n_torch, merge_states_n_triton, ATTENTION_TOLERANCES))
