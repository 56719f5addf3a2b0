"""Block-sparse prefill: patterns, their builders, the mass they cover, dense equivalence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvtier.sparse_attn import (
    AShape,
    BlockMask,
    VerticalSlash,
    attention_mass_covered,
    block_sparse_pattern,
    block_sparse_prefill,
    dense_prefill_torch,
    vertical_slash_pattern,
)
from kvtier.sparse_attn.patterns import build_plan, dense_mask

BACKENDS = ["torch", "triton"]


def sdpa_causal(q, k, v):
    G = q.shape[0] // k.shape[0]
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(G, 0), v.float().repeat_interleave(G, 0), is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patterns_that_allow_everything_equal_dense_causal_attention(backend):
    g = torch.Generator().manual_seed(0)
    H_q, H_kv, T, D = 4, 1, 131, 64
    q, k, v = torch.randn(H_q, T, D, generator=g), torch.randn(H_kv, T, D, generator=g), torch.randn(H_kv, T, D, generator=g)
    dense = sdpa_causal(q, k, v)
    everything = [
        AShape(sink_tokens=0, window_tokens=T),
        AShape(sink_tokens=T, window_tokens=0),
        VerticalSlash(torch.full((H_q, 1), -1), torch.arange(T).expand(H_q, T)),
        VerticalSlash(torch.arange(T).expand(H_q, T), torch.full((H_q, 1), -1)),
        VerticalSlash(torch.arange(0, T, 2).expand(H_q, -1), torch.arange(T).expand(H_q, -1)),  # overlapping: counted once
        BlockMask(torch.ones(H_q, 3, 3, dtype=torch.bool)),
    ]
    for pattern in everything:
        torch.testing.assert_close(block_sparse_prefill(q, k, v, pattern, backend=backend), dense, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(dense_prefill_torch(q, k, v, query_chunk=64), dense, atol=2e-5, rtol=2e-5)


def test_a_shape_is_sinks_plus_window():
    m = dense_mask(AShape(sink_tokens=2, window_tokens=3), 1, 8, torch.device("cpu"))[0]
    assert m[7].nonzero().flatten().tolist() == [0, 1, 5, 6, 7]
    assert m[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert not m.triu(1).any()


def test_plan_counts_every_allowed_pair_once():
    """Vertical columns that a slash also crosses must not be counted twice."""
    T = 200
    pattern = VerticalSlash(torch.tensor([[0, 5, 100, 199]]), torch.tensor([[0, 95, 130]]))
    plan = build_plan(pattern, 1, T, torch.device("cpu"))
    band = torch.zeros(T, T, dtype=torch.int64)
    i = torch.arange(T).view(-1, 1)
    for delta in plan.deltas[0][plan.deltas[0] >= 0].tolist():  # phase 1: key blocks qb - delta
        for qb in range(4):
            kb = qb - delta
            if kb < 0:
                continue
            rows, cols = torch.arange(qb * 64, min(T, qb * 64 + 64)), torch.arange(kb * 64, min(T, kb * 64 + 64))
            off = rows.view(-1, 1) - cols.view(1, -1)
            hit = (off >= 0) & plan.diag_mask[0][off.clamp_min(0)] & ~plan.col_mask[0][cols].view(1, -1)
            band[rows.view(-1, 1), cols.view(1, -1)] += hit.long()
    cols = plan.vertical[0][plan.vertical[0] < T]
    band[:, cols] += (i >= cols.view(1, -1)).long()  # phase 2: gathered columns
    assert torch.equal(band, dense_mask(pattern, 1, T, torch.device("cpu"))[0].long())


def test_vertical_slash_builder_finds_planted_columns_and_diagonals():
    g = torch.Generator().manual_seed(1)
    H, T, D = 2, 512, 64
    q = torch.randn(H, T, D, generator=g) * 0.1
    k = torch.randn(H, T, D, generator=g) * 0.1
    q[:, :, 0] = 4.0
    k[:, [77, 301], 0] = 20.0  # two heavy columns every query likes
    # a diagonal at offset 40: key j carries the direction of query j + 40
    dirs = torch.randn(T, D - 1, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True) * 10
    q[:, :, 1:] = dirs
    k[:, : T - 40, 1:] = dirs[40:]
    pattern = vertical_slash_pattern(q, k, num_vertical=4, num_slash=3, sink_tokens=1, window_tokens=1)
    for h in range(H):
        assert {0, 77, 301} <= set(pattern.vertical[h].tolist())
        assert {0, 40} <= set(pattern.slash[h].tolist())
    covered = attention_mass_covered(q, k, pattern, rows=torch.arange(200, T))
    assert covered > 0.9


def test_block_sparse_builder_keeps_diagonal_first_and_best_blocks():
    g = torch.Generator().manual_seed(2)
    H, T, D = 1, 64 * 6 - 5, 32
    q, k = torch.randn(H, T, D, generator=g) * 0.1, torch.randn(H, T, D, generator=g) * 0.1
    q[:, :, 0] = 1.0
    k[:, 128:192, 0] = 5.0  # block 2 stands out
    mask = block_sparse_pattern(q, k, num_blocks=1).mask[0]
    assert mask.shape == (6, 6)
    assert mask.diagonal().all() and mask[:, 0].all()
    assert mask[3:, 2].all()  # every later query block picked block 2
    assert mask.sum(1).tolist() == [1, 2, 2, 3, 3, 3]


def test_mass_covered_is_one_for_everything_and_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 100, 32, generator=g), torch.randn(1, 100, 32, generator=g)
    assert attention_mass_covered(q, k, AShape(100, 100)) == pytest.approx(1.0, abs=1e-5)
    pattern = AShape(sink_tokens=3, window_tokens=10)
    s = (q @ k.repeat(2, 1, 1).transpose(1, 2)) / 32**0.5
    s = s.masked_fill(torch.ones(100, 100, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    want = (p * dense_mask(pattern, 2, 100, q.device)).sum(-1).mean()
    assert attention_mass_covered(q, k, pattern, chunk_tokens=16) == pytest.approx(float(want), abs=1e-5)


def test_prefill_rejects_bad_input_saying_expected_and_got():
    q, k, v = torch.randn(2, 100, 64), torch.randn(1, 100, 64), torch.randn(1, 100, 64)
    cases = [
        (dict(pattern="a-shape"), r"pattern must be an AShape, VerticalSlash or BlockMask, got str"),
        (
            dict(pattern=BlockMask(torch.ones(2, 1, 1, dtype=torch.bool))),
            r"pattern.mask must have shape \[H_q, ceil\(T/64\), ceil\(T/64\)\] = \[2, 2, 2\], got \[2, 1, 1\]",
        ),
        (dict(pattern=BlockMask(torch.ones(2, 2, 2))), r"pattern.mask dtype must be one of \(bool\), got float32"),
        (
            dict(pattern=VerticalSlash(torch.tensor([[0], [100]]), torch.tensor([[0], [0]]))),
            r"pattern.vertical must hold -1 \(padding\) or values in \[0, 100\) \(T\), got values in \[0, 100\]",
        ),
        (dict(pattern=VerticalSlash(torch.tensor([[0]]), torch.tensor([[0]]))), r"pattern.vertical.shape\[0\] \(H_q\) must be 2, got 1"),
        (dict(k=torch.randn(1, 99, 64)), r"k.shape\[1\] \(T\) must be 100, got 99"),
        (dict(v=torch.randn(1, 100, 64).half()), r"v dtype must be float32 like q, got float16"),
        (
            dict(q=torch.randn(3, 100, 64), k=torch.randn(2, 100, 64), v=torch.randn(2, 100, 64)),
            r"H_q \(3\) must be a positive multiple of H_kv \(2\)",
        ),
    ]
    for change, message in cases:
        args = dict(q=q, k=k, v=v, pattern=AShape(1, 1)) | change
        with pytest.raises(ValueError, match=message):
            block_sparse_prefill(args["q"], args["k"], args["v"], args["pattern"])
    with pytest.raises(ValueError, match=r"AShape.window_tokens must be an int in \[0, inf\], got -1"):
        AShape(1, -1)
    with pytest.raises(ValueError, match=r"num_vertical must be an int in \[0, inf\], got 1.5"):
        vertical_slash_pattern(q, k, 1.5, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_prefill_on_gpu_matches_reference(dtype):
    from kvtier.sparse_attn.prefill import block_sparse_prefill_reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 1000, 128, generator=g).to(dtype).cuda()
    k, v = (torch.randn(2, 1000, 128, generator=g).to(dtype).cuda() for _ in range(2))
    for pattern in (AShape(16, 128), vertical_slash_pattern(q, k, 64, 64), block_sparse_pattern(q, k, 3)):
        got = block_sparse_prefill(q, k, v, pattern)
        ref = block_sparse_prefill_reference(q, k, v, pattern)
        tol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)


def test_torch_prefill_memory_is_bounded_by_a_chunk_even_for_a_dense_pattern(monkeypatch):
    import kvtier.sparse_attn.prefill as prefill

    monkeypatch.setattr(prefill, "CHUNK_ELEMENTS", 1 << 14)  # 128 keys per chunk for 128 query rows
    seen = []
    real = prefill._masked_state

    def spy(q, k, v, mask, scale):
        seen.append(mask.numel())
        return real(q, k, v, mask, scale)

    monkeypatch.setattr(prefill, "_masked_state", spy)
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 450, 32, generator=g), torch.randn(1, 450, 32, generator=g), torch.randn(1, 450, 32, generator=g)
    for pattern in (AShape(450, 450), BlockMask(torch.ones(2, 8, 8, dtype=torch.bool))):
        o = block_sparse_prefill(q, k, v, pattern, backend="torch")
        torch.testing.assert_close(o, sdpa_causal(q, k, v), atol=2e-5, rtol=2e-5)
    assert len(seen) > 2 * 2 * 4 and max(seen) <= prefill.QUERY_CHUNK * 128
