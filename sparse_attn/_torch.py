"""Chunked torch attention: the CPU paths (they also run on CUDA).

Keys are processed in chunks whose float32 copies and scores have a bounded number of elements
(``CHUNK_ELEMENTS``), and the chunks' states are folded with the log-sum-exp merge, so memory
does not grow with the length of the cache.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .merge import merge_pair

# float32 elements of one chunk's gathered keys (the values and the scores are no larger for
# decode); 1M elements = 4 MiB, which stays in cache (16 MiB chunks ran 2-3x slower here).
CHUNK_ELEMENTS = 1 << 20


def chunk_tokens(per_token_elements: int, split_tokens: int | None, minimum: int = 64) -> int:
    """Keys per chunk: ``split_tokens`` if given, else as many as fit in ``CHUNK_ELEMENTS``."""
    if split_tokens is not None:
        return split_tokens
    return max(minimum, CHUNK_ELEMENTS // max(per_token_elements, 1))


def attend_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, scale: float):
    """State of ``q [..., M, D]`` over one chunk ``k, v [..., C, D]`` (float32); ``valid [..., C]``
    (broadcast over M) masks keys. Returns ``(o [..., M, D], lse [..., M])``; no key gives (0, -inf)."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [..., M, C]
    if valid is not None:
        s.masked_fill_(~valid.unsqueeze(-2), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [..., M]
    lse_safe = torch.where(torch.isneginf(lse), 0.0, lse)
    p = torch.exp_(s.sub_(lse_safe.unsqueeze(-1)))
    return torch.matmul(p, v), lse


def fold(chunks: Iterator[tuple[torch.Tensor, torch.Tensor]], shape_o, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a stream of float32 states; the empty stream is the empty state."""
    o = torch.zeros(shape_o, dtype=torch.float32, device=device)
    lse = torch.full(shape_o[:-1], float("-inf"), dtype=torch.float32, device=device)
    for o_c, lse_c in chunks:
        o, lse = merge_pair(o, lse, o_c, lse_c)
    return o, lse


def chunked_states(
    q: torch.Tensor,
    num_keys: int,
    chunk: int,
    gather: Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``attend_chunk`` over key positions ``[0, num_keys)`` in chunks; ``gather(lo, hi)``
    returns float32 ``(k, v, valid)`` for positions ``[lo, hi)``."""
    if 0 < num_keys <= chunk:  # one chunk: its state is the result (folding it into the empty state changes nothing)
        k, v, valid = gather(0, num_keys)
        return attend_chunk(q, k, v, valid, scale)

    def states():
        for lo in range(0, num_keys, chunk):
            k, v, valid = gather(lo, min(lo + chunk, num_keys))
            yield attend_chunk(q, k, v, valid, scale)

    return fold(states(), q.shape, q.device)
