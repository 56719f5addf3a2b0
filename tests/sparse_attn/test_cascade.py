"""Hydragen shared-prefix decode and prefix trees equal per-sequence attention."""

from __future__ import annotations

import pytest
import torch

from kvtier.sparse_attn import KVLevel, cascade_decode, shared_prefix_decode, sparse_decode

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shared_prefix_equals_per_sequence_attention(backend, dtype):
    g = torch.Generator().manual_seed(1)
    B, H_q, H_kv, D, T_p, T_s = 6, 8, 2, 64, 70, 9
    q = torch.randn(B, H_q, D, generator=g).to(dtype)
    pk, pv = (torch.randn(H_kv, T_p, D, generator=g).to(dtype) for _ in range(2))
    sk, sv = (torch.randn(B, H_kv, T_s, D, generator=g).to(dtype) for _ in range(2))
    suffix_lengths = torch.tensor([9, 0, 4, 1, 9, 7])
    o, lse = shared_prefix_decode(q, pk, pv, sk, sv, suffix_lengths=suffix_lengths, backend=backend)
    # per sequence: its own copy of prefix + suffix in one contiguous cache
    k = torch.cat([pk.expand(B, -1, -1, -1), sk], 2)
    v = torch.cat([pv.expand(B, -1, -1, -1), sv], 2)
    want = sparse_decode(q.float(), k.float(), v.float(), None, T_p + suffix_lengths, backend="torch")
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(o.float(), want[0], atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want[1], atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_prefixes_and_a_three_level_tree(backend):
    """system prompt (all) -> one of two documents -> per-sequence suffix, vs each path concatenated."""
    g = torch.Generator().manual_seed(2)
    B, H_q, H_kv, D = 7, 3, 1, 64
    r = lambda *s: torch.randn(*s, generator=g)
    q = r(B, H_q, D)
    system = KVLevel(r(1, H_kv, 20, D), r(1, H_kv, 20, D), None, torch.zeros(B, dtype=torch.int64))
    doc_of = torch.tensor([0, 1, 1, 0, -1, 1, 0])
    docs = KVLevel(r(2, H_kv, 33, D), r(2, H_kv, 33, D), torch.tensor([33, 17]), doc_of)
    suffix = KVLevel(r(B, H_kv, 4, D), r(B, H_kv, 4, D), torch.tensor([4, 3, 2, 1, 0, 4, 4]), None)
    o, lse = cascade_decode(q, [system, docs, suffix], backend=backend, split_tokens=32)
    for b in range(B):
        parts = [(system.k[0], system.v[0])]
        d = int(doc_of[b])
        if d >= 0:
            n = int(docs.lengths[d])
            parts.append((docs.k[d, :, :n], docs.v[d, :, :n]))
        n = int(suffix.lengths[b])
        parts.append((suffix.k[b, :, :n], suffix.v[b, :, :n]))
        k = torch.cat([p[0] for p in parts], 1)[None]
        v = torch.cat([p[1] for p in parts], 1)[None]
        want = sparse_decode(q[b : b + 1], k, v, backend="torch")
        torch.testing.assert_close(o[b : b + 1], want[0], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[b : b + 1], want[1], atol=2e-5, rtol=2e-5)
    # the same through shared_prefix_decode with several prefixes
    o2, _ = shared_prefix_decode(
        q,
        docs.k,
        docs.v,
        suffix.k,
        suffix.v,
        prefix_lengths=docs.lengths,
        suffix_lengths=suffix.lengths,
        seq_to_prefix=doc_of,
        backend=backend,
    )
    o3, _ = cascade_decode(q, [docs, suffix], backend="torch")
    torch.testing.assert_close(o2, o3, atol=2e-5, rtol=2e-5)


def test_cascade_rejects_bad_input():
    q = torch.randn(2, 4, 64)
    lvl = KVLevel(torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64), None, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"levels must be a non-empty list of KVLevel"):
        cascade_decode(q, [])
    with pytest.raises(ValueError, match=r"levels\[0\].seq_to_node must lie in \[-1, 1\), got values in \[0, 1\]"):
        cascade_decode(q, [KVLevel(lvl.k, lvl.v, None, torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match=r"levels\[1\] has no seq_to_node, so it needs one node per sequence \(N = B = 2\), got N = 3"):
        cascade_decode(q, [lvl, KVLevel(torch.randn(3, 2, 5, 64), torch.randn(3, 2, 5, 64))])
    with pytest.raises(ValueError, match=r"levels\[1\].k.shape\[1\] \(H_kv \(as levels\[0\]\)\) must be 2, got 1"):
        cascade_decode(q, [lvl, KVLevel(torch.randn(2, 1, 5, 64), torch.randn(2, 1, 5, 64))])
    with pytest.raises(ValueError, match=r"levels\[0\].lengths must lie in \[0, 5\], got values in \[6, 6\]"):
        cascade_decode(q, [KVLevel(lvl.k, lvl.v, torch.tensor([6]), lvl.seq_to_node)])
    with pytest.raises(ValueError, match=r"seq_to_prefix \[B\] is required with 2 prefixes"):
        shared_prefix_decode(q, torch.randn(2, 2, 5, 64), torch.randn(2, 2, 5, 64))
    with pytest.raises(ValueError, match=r"suffix_k and suffix_v go together"):
        shared_prefix_decode(q, lvl.k[0], lvl.v[0], torch.randn(2, 2, 3, 64))
