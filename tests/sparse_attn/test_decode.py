"""Sparse decode: all-selected equals dense, paged equals contiguous, bounded chunks, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kvtier.sparse_attn._torch as torch_paths
from kvtier.kvstore.spec import KVSpec
from kvtier.sparse_attn import sparse_decode, sparse_decode_paged
from kvtier.sparse_attn.decode import sparse_decode_reference

BACKENDS = ["torch", "triton"]


def dense_sdpa(q, k, v, lengths=None):
    """Dense decode with torch's SDPA (GQA by repeating KV heads), per sequence length."""
    B, H_q, D = q.shape
    G = H_q // k.shape[1]
    out = []
    for b in range(B):
        t = k.shape[2] if lengths is None else int(lengths[b])
        kb, vb = k[b, :, :t].repeat_interleave(G, 0), v[b, :, :t].repeat_interleave(G, 0)
        out.append(F.scaled_dot_product_attention(q[b, :, None].float(), kb.float(), vb.float())[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [1, 3, 4])
def test_all_selected_equals_dense(backend, G):
    torch.manual_seed(G)
    B, H_kv, T, D = 2, 2, 45, 64
    q, k, v = torch.randn(B, G * H_kv, D), torch.randn(B, H_kv, T, D), torch.randn(B, H_kv, T, D)
    lengths = torch.tensor([T, 30])
    # every valid token, in a shuffled order per head, padded to T with -1
    idx = torch.full((B, H_kv, T), -1)
    for b in range(B):
        for h in range(H_kv):
            n = int(lengths[b])
            idx[b, h, :n] = torch.randperm(n)
    dense = dense_sdpa(q, k, v, lengths)
    o, lse = sparse_decode(q, k, v, idx, lengths, backend=backend, split_tokens=32)
    torch.testing.assert_close(o, dense, atol=2e-5, rtol=2e-5)
    o2, lse2 = sparse_decode(q, k, v, None, lengths, backend=backend)  # indices=None: all tokens
    torch.testing.assert_close(o2, dense, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse2, lse, atol=2e-5, rtol=2e-5)


@settings(max_examples=15, deadline=None)
@given(split=st.integers(1, 80), seed=st.integers(0, 10**6), backend=st.sampled_from(BACKENDS))
def test_any_split_gives_the_same_result(split, seed, backend):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(1, 4, 64, generator=g), torch.randn(1, 1, 70, 64, generator=g), torch.randn(1, 1, 70, 64, generator=g)
    idx = torch.randperm(70, generator=g)[:53].view(1, 1, -1)
    ref = sparse_decode_reference(q, k, v, idx)
    got = sparse_decode(q, k, v, idx, split_tokens=split, backend=backend)
    torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got[1], ref[1], atol=2e-5, rtol=2e-5)


def _store_pool(spec, k, v, g):
    """Write a contiguous cache ``[B, H_kv, T, D]`` into a pool of store-layout blocks (layer 1)."""
    B, H_kv, T, D = k.shape
    P = spec.block_tokens
    nb = -(-T // P)
    N = B * nb + 3
    pool = torch.randn(N, *spec.block_shape, generator=g).to(k.dtype)  # [N, L, 2, H_kv, P, D]
    table = torch.randperm(N, generator=g)[: B * nb].view(B, nb)
    for b in range(B):
        for i in range(nb):
            t1 = min(T, (i + 1) * P)
            pool[table[b, i], 1, 0, :, : t1 - i * P] = k[b, :, i * P : t1]
            pool[table[b, i], 1, 1, :, : t1 - i * P] = v[b, :, i * P : t1]
    return pool, table


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_paged_blocks_equal_contiguous(backend, dtype):
    spec = KVSpec("test", num_layers=2, num_kv_heads=2, head_dim=64, dtype=str(dtype)[6:], block_tokens=16)
    g = torch.Generator().manual_seed(3)
    B, T = 2, 50
    q = torch.randn(B, 6, 64, generator=g).to(dtype)
    k, v = torch.randn(B, 2, T, 64, generator=g).to(dtype), torch.randn(B, 2, T, 64, generator=g).to(dtype)
    pool, table = _store_pool(spec, k, v, g)
    lengths = torch.tensor([50, 33])
    idx = torch.stack([torch.stack([torch.randperm(int(n), generator=g)[:20] for _ in range(2)]) for n in lengths])
    idx[1, 0, 5:] = -1
    for indices in (idx, None):
        want = sparse_decode(q, k, v, indices, lengths, backend=backend)
        got = sparse_decode_paged(q, pool, table, indices, lengths, layer=1, backend=backend)
        torch.testing.assert_close(got[0].float(), want[0].float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got[1], want[1], atol=2e-4, rtol=2e-4)


def test_torch_path_memory_is_bounded_by_a_chunk(monkeypatch):
    """However long the cache, a chunk's float32 keys and scores stay under CHUNK_ELEMENTS."""
    monkeypatch.setattr(torch_paths, "CHUNK_ELEMENTS", 1 << 15)
    seen = []
    real = torch_paths.attend_chunk

    def spy(q, k, v, valid, scale):
        seen.append((k.numel(), q.shape[:-1].numel() * k.shape[-2]))
        return real(q, k, v, valid, scale)

    monkeypatch.setattr(torch_paths, "attend_chunk", spy)
    B, H_q, H_kv, T, D = 1, 8, 2, 20_001, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H_q, D, generator=g).half()
    k, v = torch.randn(B, H_kv, T, D, generator=g).half(), torch.randn(B, H_kv, T, D, generator=g).half()
    o, lse = sparse_decode(q, k, v, backend="torch")
    assert len(seen) > 50
    assert max(n for n, _ in seen) <= 1 << 15 and max(s for _, s in seen) <= 1 << 15
    torch.testing.assert_close(o.float(), dense_sdpa(q, k, v), atol=2e-3, rtol=2e-3)


def test_empty_selection_gives_zero_output_and_minus_inf_lse():
    q, k, v = torch.randn(2, 4, 64), torch.randn(2, 2, 10, 64), torch.randn(2, 2, 10, 64)
    for backend in BACKENDS:
        o, lse = sparse_decode(q, k, v, torch.zeros(2, 2, 0, dtype=torch.int64), backend=backend)
        assert (o == 0).all() and torch.isneginf(lse).all()
        o, lse = sparse_decode(q, k, v, None, torch.tensor([0, 10]), backend=backend)
        assert (o[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


def test_sparse_decode_rejects_bad_input_saying_expected_and_got():
    q, k, v = torch.randn(2, 4, 64), torch.randn(2, 2, 10, 64), torch.randn(2, 2, 10, 64)
    idx = torch.zeros(2, 2, 3, dtype=torch.int64)
    cases = [
        (dict(q=torch.randn(2, 4)), r"q must have shape \[B, H_q, D\] \(3 dims\), got \[2, 4\]"),
        (dict(k=k.half()), r"k dtype must be float32 like q, got float16"),
        (dict(v=torch.randn(2, 2, 11, 64)), r"v must have the shape of k \[2, 2, 10, 64\], got \[2, 2, 11, 64\]"),
        (dict(q=torch.randn(2, 3, 64)), r"H_q \(3\) must be a positive multiple of H_kv \(2\)"),
        (dict(k=torch.randn(3, 2, 10, 64), v=torch.randn(3, 2, 10, 64)), r"k.shape\[0\] \(B\) must be 2, got 3"),
        (dict(indices=idx.float()), r"indices dtype must be one of \(int32, int64\), got float32"),
        (dict(indices=torch.zeros(2, 3, 3, dtype=torch.int64)), r"indices.shape\[1\] \(H_kv\) must be 2, got 3"),
        (
            dict(indices=torch.tensor([[[0, 9, 10]], [[0, 0, 0]]]).expand(2, 2, 3).contiguous()),
            r"indices must be -1 \(padding\) or token ids in \[0, lengths\[b\]\); got 10 at \[0, 0, 2\]",
        ),
        (dict(indices=idx - 2), r"got -2 at \[0, 0, 0\]"),
        (dict(indices=idx + 5, lengths=torch.tensor([10, 5])), r"got 5 at \[1, 0, 0\] where lengths\[1\] = 5"),
        (dict(lengths=torch.tensor([10, 11])), r"lengths must lie in \[0, 10\], got values in \[10, 11\]"),
        (dict(lengths=torch.tensor([10])), r"lengths.shape\[0\] \(one per sequence\) must be 2, got 1"),
        (dict(scale=-1.0), r"scale must be a positive finite float or None"),
        (dict(split_tokens=0), r"split_tokens \(or None\) must be an int in \[1, inf\], got 0"),
        (dict(backend="gpu"), r"backend must be one of"),
    ]
    for change, message in cases:
        args = dict(q=q, k=k, v=v, indices=idx, lengths=None) | change
        with pytest.raises(ValueError, match=message):
            sparse_decode(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("indices"), args.pop("lengths"), **args)


def test_sparse_decode_paged_rejects_bad_input():
    q = torch.randn(2, 4, 64)
    pool = torch.randn(5, 2, 2, 2, 16, 64)
    table = torch.tensor([[0, 1], [2, -1]])
    with pytest.raises(ValueError, match=r"kv_blocks must have shape \[N, L, 2, H_kv, P, D\] \(6 dims\), got \[5, 2, 2, 16, 64\]"):
        sparse_decode_paged(q, pool[:, 0], table)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 1\], got 2"):
        sparse_decode_paged(q, pool, table, layer=2)
    with pytest.raises(ValueError, match=r"block_table entries of used blocks must lie in \[0, 5\).*got -1 at \[1, 1\]"):
        sparse_decode_paged(q, pool, table, lengths=torch.tensor([32, 17]))
    with pytest.raises(ValueError, match=r"got 7 at \[0, 0\]"):
        sparse_decode_paged(q, pool, torch.tensor([[7, 1], [2, 3]]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 32\]"):
        sparse_decode_paged(q, pool, table, lengths=torch.tensor([33, 1]))
    # unused entries past a sequence's last block are ignored
    o, _ = sparse_decode_paged(q, pool, table, lengths=torch.tensor([32, 16]))
    assert torch.isfinite(o).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_decode_on_gpu_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 32, 128, generator=g).to(dtype).cuda()
    k, v = (torch.randn(3, 8, 5000, 128, generator=g).to(dtype).cuda() for _ in range(2))
    idx = torch.randint(0, 5000, (3, 8, 777), generator=g).cuda()
    idx[0, 0, ::2] = -1
    ref = sparse_decode_reference(q, k, v, idx)
    got = sparse_decode(q, k, v, idx)
    tol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got[0].float(), ref[0], atol=tol, rtol=tol)
    torch.testing.assert_close(got[1], ref[1], atol=tol, rtol=tol)
