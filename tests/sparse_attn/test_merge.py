"""LSE merge: associativity, identity of the empty state, split-equals-dense (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.sparse_attn import merge_states, merge_states_n

BACKENDS = ["torch", "triton"]


def attend(q, k, v):
    """Plain float64 attention state of ``q [M, D]`` over ``k, v [T, D]`` (T may be 0)."""
    s = q.double() @ k.double().T / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, -1)
    if k.shape[0] == 0:
        return torch.zeros(q.shape, dtype=torch.float32), lse.float()
    return (torch.softmax(s, -1) @ v.double()).float(), lse.float()


def random_state(seed, rows=3, D=8, empty=False):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(rows, D, generator=g)
    lse = torch.randn(rows, generator=g) * 4
    if empty:
        lse[0] = float("-inf")
        o[0] = float("nan")  # garbage under an empty state must not leak
    return o, lse


@settings(max_examples=40, deadline=None)
@given(
    seeds=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6)),
    empties=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    backend=st.sampled_from(BACKENDS),
)
def test_merge_is_associative_and_commutative(seeds, empties, backend):
    a, b, c = (random_state(s, empty=e) for s, e in zip(seeds, empties))
    left = merge_states(*merge_states(*a, *b, backend=backend), *c, backend=backend)
    right = merge_states(*a, *merge_states(*b, *c, backend=backend), backend=backend)
    swapped = merge_states(*merge_states(*c, *a, backend=backend), *b, backend=backend)
    n_way = merge_states_n(torch.stack([a[0], b[0], c[0]]), torch.stack([a[1], b[1], c[1]]), backend=backend)
    for other in (right, swapped, n_way):
        torch.testing.assert_close(left[0], other[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(left[1], other[1], atol=1e-5, rtol=1e-5)
    assert not torch.isnan(left[0]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_state_is_the_identity(backend):
    o, lse = random_state(1)
    empty = (torch.full_like(o, float("nan")), torch.full_like(lse, float("-inf")))
    for got in (merge_states(o, lse, *empty, backend=backend), merge_states(*empty, o, lse, backend=backend)):
        torch.testing.assert_close(got[0], o)
        torch.testing.assert_close(got[1], lse)
    both = merge_states(*empty, *empty, backend=backend)
    assert (both[0] == 0).all() and torch.isneginf(both[1]).all()
    none = merge_states_n(torch.zeros(0, 3, 8), torch.zeros(0, 3), backend=backend)
    assert none[0].shape == (3, 8) and (none[0] == 0).all() and torch.isneginf(none[1]).all()


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 60), cuts=st.lists(st.integers(0, 60), max_size=5), seed=st.integers(0, 10**6), backend=st.sampled_from(BACKENDS))
def test_split_anywhere_then_merge_equals_dense(T, cuts, seed, backend):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(4, 16, generator=g), torch.randn(T, 16, generator=g) * 2, torch.randn(T, 16, generator=g)
    bounds = [0] + sorted(min(c, T) for c in cuts) + [T]  # empty parts included
    parts = [attend(q, k[a:b], v[a:b]) for a, b in zip(bounds, bounds[1:])]
    dense = attend(q, k, v)
    o, lse = parts[0]
    for part in parts[1:]:
        o, lse = merge_states(o, lse, *part, backend=backend)
    o_n, lse_n = merge_states_n(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), backend=backend)
    for got_o, got_lse in ((o, lse), (o_n, lse_n)):
        torch.testing.assert_close(got_o, dense[0], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got_lse, dense[1], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_keeps_dtype_and_leading_shape(backend):
    o = torch.randn(2, 3, 5, 64, dtype=torch.float16)
    lse = torch.randn(2, 3, 5)
    out, out_lse = merge_states(o, lse, o, lse, backend=backend)
    assert out.dtype == torch.float16 and out.shape == (2, 3, 5, 64) and out_lse.dtype == torch.float32
    torch.testing.assert_close(out_lse, lse + math.log(2))
    torch.testing.assert_close(out, o)


def test_merge_rejects_bad_input_saying_expected_and_got():
    o, lse = torch.randn(3, 8), torch.randn(3)
    with pytest.raises(ValueError, match=r"o_b must have the shape of o_a \[3, 8\], got \[3, 9\]"):
        merge_states(o, lse, torch.randn(3, 9), lse)
    with pytest.raises(ValueError, match=r"lse_a dtype must be one of \(float32\), got float16"):
        merge_states(o, lse.half(), o, lse)
    with pytest.raises(ValueError, match=r"o_b dtype must be float32 like o_a, got float16"):
        merge_states(o, lse, o.half(), lse)
    with pytest.raises(ValueError, match=r"lse_b must have shape \[3\]"):
        merge_states(o, lse, o, torch.randn(4))
    with pytest.raises(ValueError, match=r"backend must be one of"):
        merge_states(o, lse, o, lse, backend="cuda")
    with pytest.raises(ValueError, match=r"lse must have shape \[2, 3\]"):
        merge_states_n(torch.randn(2, 3, 8), torch.randn(2, 4))
