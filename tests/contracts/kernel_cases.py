"""Argument builders for every registered sparse-attention kernel, over one lean grid.

Each builder takes a :class:`Case` and returns the positional arguments of the kernel's
implementations (the registry's signature). The grid covers odd lengths, GQA ratios 1/3/4,
head_dim 64/128, fp16/fp32, ``-1`` padding, empty selections and several splits, at shapes
small enough for Triton's interpreter.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from kvtier.sparse_attn import AShape, KVLevel, VerticalSlash, block_sparse_pattern, vertical_slash_pattern


@dataclass(frozen=True)
class Case:
    T: int
    G: int  # query heads per KV head
    H_kv: int
    D: int
    dtype: torch.dtype
    variant: str = "plain"  # kernel-specific: padding, empty, split, ...

    @property
    def id(self) -> str:
        return f"T{self.T}-G{self.G}-Hkv{self.H_kv}-D{self.D}-{str(self.dtype)[6:]}-{self.variant}"


GRID = [
    Case(37, 1, 2, 64, torch.float32),
    Case(50, 3, 1, 128, torch.float16, "padding"),
    Case(23, 4, 2, 64, torch.float16, "empty"),
    Case(65, 4, 1, 128, torch.float32, "split"),
    Case(41, 3, 2, 64, torch.float32, "padding"),
]


def _g(case: Case, seed: int) -> torch.Generator:
    """A generator seeded from the case and a salt, the same in every process (never ``hash()``)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{case.id}/{seed}".encode()))


def _randn(case, *shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_g(case, seed)) * scale).to(case.dtype)


def _state(case, S, B, H, seed):
    o = _randn(case, S, B, H, case.D, seed=seed)
    lse = torch.randn(S, B, H, generator=_g(case, seed + 1)) * 3
    if case.variant in ("empty", "padding"):
        lse[0, 0] = float("-inf")  # an empty state (its o is garbage and must not leak)
        o[0, 0] = float("nan") if case.dtype == torch.float32 else 1e4
    if case.variant == "empty":
        lse[:, -1] = float("-inf")  # every state of a row empty
    return o, lse


def merge_states_args(case: Case):
    o, lse = _state(case, 2, 3, case.G * case.H_kv, seed=1)
    return (o[0], lse[0], o[1], lse[1])


def merge_states_n_args(case: Case):
    if case.variant == "empty":  # no states at all: the empty state
        return (_randn(case, 0, 3, case.G * case.H_kv, case.D), torch.zeros(0, 3, case.G * case.H_kv))
    o, lse = _state(case, 1 + case.T % 5, 3, case.G * case.H_kv, seed=2)
    return (o, lse)


def _indices(case, B, T, lengths):
    K = 0 if case.variant == "empty" and case.H_kv == 2 else min(T, 7 + case.T // 3)
    g = _g(case, 7)
    idx = (
        torch.stack([torch.stack([torch.randperm(int(lengths[b]), generator=g)[:K] for _ in range(case.H_kv)]) for b in range(B)])
        if K
        else torch.zeros(B, case.H_kv, 0, dtype=torch.int64)
    )
    if idx.shape[-1] < K:  # a short sequence: pad
        idx = torch.nn.functional.pad(idx, (0, K - idx.shape[-1]), value=-1)
    if case.variant == "padding" and K:
        idx[0, 0, ::3] = -1
        idx[-1, -1, :] = -1  # a head with nothing selected
    return idx


def _split(case):
    return 16 if case.variant == "split" else None


def sparse_decode_args(case: Case):
    B, T = 2, case.T
    q = _randn(case, B, case.G * case.H_kv, case.D, seed=3)
    k = _randn(case, B, case.H_kv, T, case.D, seed=4)
    v = _randn(case, B, case.H_kv, T, case.D, seed=5)
    lengths = torch.tensor([T, max(1, T - 9)])
    return (q, k, v, _indices(case, B, T, lengths), lengths, None, _split(case))


def sparse_decode_paged_args(case: Case):
    B, P, L, N = 2, 16, 2, 9
    q = _randn(case, B, case.G * case.H_kv, case.D, seed=6)
    pool = _randn(case, N, L, 2, case.H_kv, P, case.D, seed=7)
    max_blocks = -(-case.T // P)
    table = (
        torch.randperm(N, generator=_g(case, 8))[: 2 * max_blocks].view(2, max_blocks)
        if 2 * max_blocks <= N
        else torch.randint(0, N, (2, max_blocks), generator=_g(case, 8))
    )
    lengths = torch.tensor([case.T, max(1, case.T - 17)])
    table[1, -(-int(lengths[1]) // P) :] = -1  # unused table entries
    indices = None if case.variant == "plain" else _indices(case, B, case.T, lengths)
    return (q, pool, table, indices, lengths, 1, None, _split(case))


def cascade_decode_args(case: Case):
    B = 5
    H_q = case.G * case.H_kv
    q = _randn(case, B, H_q, case.D, seed=9)
    kv = lambda n, t, s: (_randn(case, n, case.H_kv, t, case.D, seed=s), _randn(case, n, case.H_kv, t, case.D, seed=s + 1))
    system = KVLevel(*kv(1, case.T, 10), None, torch.tensor([0, 0, 0, -1, 0]))
    docs = KVLevel(*kv(2, case.T // 2 + 3, 12), torch.tensor([case.T // 2, 0]), torch.tensor([1, 0, 1, 0, -1]))
    suffix_lengths = torch.tensor([5, 1, 0, 3, 0]) if case.variant == "empty" else torch.tensor([5, 1, 2, 3, 4])
    suffix = KVLevel(*kv(B, 5, 14), suffix_lengths, None)
    return (q, [system, docs, suffix], None, _split(case))


def block_sparse_prefill_args(case: Case):
    H_q, T = case.G * case.H_kv, case.T + 64  # > one block
    q = _randn(case, H_q, T, case.D, seed=15)
    k = _randn(case, case.H_kv, T, case.D, seed=16)
    v = _randn(case, case.H_kv, T, case.D, seed=17)
    kinds = {
        "plain": lambda: AShape(sink_tokens=3, window_tokens=20),
        "padding": lambda: VerticalSlash(
            torch.tensor([[-1, 2, 70, T - 1]]).repeat(H_q, 1), torch.tensor([[0, -1, 5, 64, 90]]).repeat(H_q, 1)
        ),
        "empty": lambda: VerticalSlash(torch.full((H_q, 2), -1), torch.tensor([[3, -1]]).repeat(H_q, 1)),  # rows < 3 empty
        "split": lambda: block_sparse_pattern(q, k, 1),
    }
    pattern = kinds.get(case.variant, lambda: vertical_slash_pattern(q, k, 9, 7, last_q=16, sink_tokens=2, window_tokens=4))()
    return (q, k, v, pattern, None)


BUILDERS = {
    "merge_states": merge_states_args,
    "merge_states_n": merge_states_n_args,
    "sparse_decode": sparse_decode_args,
    "sparse_decode_paged": sparse_decode_paged_args,
    "cascade_decode": cascade_decode_args,
    "block_sparse_prefill": block_sparse_prefill_args,
}
