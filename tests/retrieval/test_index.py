"""KeyIndex backends: add/search round trips on small data, incremental adds, padding, scanned fraction."""

from __future__ import annotations

import pytest
import torch

from kvtier.retrieval import available_indexes, make_index

# exhaustive settings for the approximate backends, so that on small data they must be exact
EXHAUSTIVE = {
    "exact": {},
    "flat": {},
    "ivf": {"nlist": 16, "nprobe": 16, "min_train": 256},
    # norm_margin: later adds stay under the first add's norm bound of the MIPS reduction
    "hnsw": {"m": 16, "ef_search": 600, "ef_construction": 200, "norm_margin": 2.0},
}


def _data(seed, n=600, m=7, d=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)


def test_every_backend_is_covered():
    assert set(EXHAUSTIVE) == set(available_indexes())


@pytest.mark.parametrize("name", list(EXHAUSTIVE))
def test_round_trip_and_incremental_adds(name):
    x, q = _data(0)
    idx = make_index(name, 16, **EXHAUSTIVE[name])
    for lo, hi in ((0, 100), (100, 350), (350, 351), (351, 600)):  # IVF trains at 256, mid-stream
        idx.add(x[lo:hi])
        assert idx.ntotal == hi
        s, ids = idx.search(q, 10)
        ref = (q @ x[:hi].T).topk(10)
        assert torch.equal(ids, ref.indices), f"{name} after {hi} vectors"
        assert torch.allclose(s, ref.values, atol=1e-4)
    # a vector finds itself as its own best match among near-orthogonal data
    s, ids = idx.search(x[42:43] * 100, 1)
    assert ids.item() == (x[42:43] @ x.T).argmax().item()


@pytest.mark.parametrize("name", list(EXHAUSTIVE))
def test_padding_when_fewer_than_k(name):
    x, q = _data(1, n=5)
    idx = make_index(name, 16, **EXHAUSTIVE[name])
    s, ids = idx.search(q, 3)
    assert (ids == -1).all() and torch.isinf(s).all()  # empty index
    idx.add(x)
    s, ids = idx.search(q, 8)
    assert ids.shape == (7, 8)
    assert (ids[:, 5:] == -1).all() and torch.isneginf(s[:, 5:]).all()
    assert sorted(ids[0, :5].tolist()) == list(range(5))


@pytest.mark.parametrize("mips_to_l2", [True, False])
def test_hnsw_graph_kinds_round_trip(mips_to_l2):
    x, q = _data(5, n=800)
    idx = make_index("hnsw", 16, m=16, ef_search=800, ef_construction=200, mips_to_l2=mips_to_l2)
    idx.add(x)
    s, ids = idx.search(q, 10)
    ref = (q @ x.T).topk(10)
    assert torch.equal(ids, ref.indices)
    assert torch.allclose(s, ref.values, atol=1e-3)
    with pytest.raises(ValueError, match="norm_margin"):
        make_index("hnsw", 16, mips_to_l2=True, norm_margin=0.5)


def test_ivf_scans_a_fraction():
    x, q = _data(2, n=4000)
    idx = make_index("ivf", 16, nlist=64, nprobe=4, min_train=1000)
    idx.add(x)
    idx.search(q, 10)
    assert 0 < idx.last_scanned < 0.25  # 4 of 64 lists plus the 64 centroids
    hnsw = make_index("hnsw", 16, m=8, ef_search=16)
    hnsw.add(x)
    hnsw.search(q, 10)
    assert 0 < hnsw.last_scanned < 1.0


@pytest.mark.parametrize("name", list(EXHAUSTIVE))
def test_bad_input(name):
    idx = make_index(name, 16, **EXHAUSTIVE[name])
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        idx.add(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="finite"):
        idx.add(torch.full((3, 16), float("nan")))
    with pytest.raises(ValueError, match="k must be"):
        idx.search(torch.zeros(1, 16), 0)
    assert idx.ntotal == 0  # bad input changed nothing
    with pytest.raises(ValueError, match="unknown index backend"):
        make_index("annoy", 16)
    with pytest.raises(ValueError, match="dim"):
        make_index(name, 0)


def test_gpu_refused_without_gpu():
    from kvtier.retrieval import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="GPU"):
        make_index("flat", 16, use_gpu=True)
