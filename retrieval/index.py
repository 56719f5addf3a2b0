"""KeyIndex: maximum inner product search over the keys (or page representatives) of one (layer, KV head).

Backends, by name (``make_index(name, dim, **options)``; ``available_indexes()``):

- ``exact``: a float32 torch matrix, ``q @ K.T`` then ``topk``. Scans every key.
- ``flat``: faiss ``IndexFlatIP`` (same answer, faiss's BLAS kernels).
- ``ivf``: faiss ``IndexIVFFlat`` (inner product). Options: ``nlist`` (lists; default
  ``4 * sqrt(N)`` at training time), ``nprobe`` (lists scanned per query), ``min_train`` (vectors
  held and searched exactly until the index trains on them).
- ``hnsw``: faiss ``IndexHNSWFlat``. Options: ``m``, ``ef_construction``, ``ef_search``,
  ``mips_to_l2`` (default True: the graph is built on L2 after the MIPS reduction; see
  ``HNSWIndex``), ``norm_margin``.

Ids are the positions in add order (token positions when a sequence's keys are added as it
grows, page ids for page representatives). ``search`` returns ``(scores, ids)`` ``[M, k]``, best
first, ``-1`` / ``-inf`` where fewer than ``k`` vectors exist, and records in ``last_scanned`` the
mean fraction of the indexed vectors whose inner product was computed per query (coarse
centroids and graph hops included): the x-axis of every recall plot.

Queries are out of distribution for keys (RetrievalAttention): the keys a query attends most
are not its nearest neighbours among the keys, so an index built on keys alone needs to scan
more to find them. A query-aware IVF (lists trained on prefill queries) was measured on the
reference model's real queries (``bench/retrieval.py``, part 2) and found *worse* at equal
scanned fraction than lists trained on the keys, so it is not offered here; the bench keeps the
variant (``QueryAwareIVF``) to reproduce the figure. ``IVFIndex`` has two hooks for such
variants: ``_centroids(x)`` and ``_probe(q, nprobe)``.

GPU: with a faiss build that has GPUs and ``use_gpu=True`` (default: when one is present) the
flat and IVF backends move to the GPU (faiss has no GPU HNSW; it stays on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import faiss
import numpy as np
import torch

from kvtier.checks import check_int
from kvtier.registry import Registry, check_options

_INDEXES: Registry[Callable[..., "KeyIndex"]] = Registry("index backend")


def register_index(name: str):
    """Class decorator: make the class available as ``make_index(name, dim, **options)``."""

    def deco(cls):
        cls.name = name
        return _INDEXES.register(cls, name=name)

    return deco


def available_indexes() -> list[str]:
    return _INDEXES.names()


def make_index(name: str, dim: int, **options) -> "KeyIndex":
    """A new empty index of backend ``name`` over ``dim``-dimensional vectors."""
    cls = _INDEXES.get(name)
    check_options(cls, {"dim": dim, **options}, f"index backend {name!r}")
    return cls(dim, **options)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _as_f32(x, dim: int, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must be [N, {dim}], got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} must be finite")
    return x


def _check_k(k: int) -> None:
    check_int("k", k, low=1)


def _pad_result(scores: np.ndarray, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    scores = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    return torch.where(ids < 0, torch.tensor(float("-inf")), scores), ids


@dataclass
class IndexStats:
    searches: int = 0
    queries: int = 0
    scanned: float = 0.0  # sum over queries of the scanned fraction


class KeyIndex:
    """Base class: ``add`` vectors (ids continue from ``ntotal``), ``search`` top-``k`` inner products."""

    name = "base"

    def __init__(self, dim: int) -> None:
        check_int("dim", dim, low=1)
        self.dim = dim
        self.last_scanned = 0.0
        self.stats = IndexStats()

    @property
    def ntotal(self) -> int:
        raise NotImplementedError

    def add(self, x) -> None:
        """Append vectors ``x [N, D]`` (float tensor or array); they get ids ``ntotal .. ntotal+N-1``."""
        raise NotImplementedError

    def search(self, q, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [M, k] float32, ids [M, k] int64)`` of the top-``k`` inner products of ``q [M, D]``."""
        raise NotImplementedError

    def _record(self, num_queries: int, scanned: float) -> None:
        self.last_scanned = scanned
        self.stats.searches += 1
        self.stats.queries += num_queries
        self.stats.scanned += scanned * num_queries

    @property
    def nbytes(self) -> int:
        return self.ntotal * self.dim * 4


@register_index("exact")
class ExactIndex(KeyIndex):
    """torch ``q @ K.T`` + ``topk`` over a growable float32 buffer (capacity doubles)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._buf = torch.empty(0, dim)
        self._n = 0

    @property
    def ntotal(self) -> int:
        return self._n

    def add(self, x) -> None:
        x = torch.from_numpy(_as_f32(x, self.dim, "x"))
        need = self._n + x.shape[0]
        if need > self._buf.shape[0]:
            buf = torch.empty(max(need, 2 * self._buf.shape[0], 64), self.dim)
            buf[: self._n] = self._buf[: self._n]
            self._buf = buf
        self._buf[self._n : need] = x
        self._n = need

    def search(self, q, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_k(k)
        q = torch.from_numpy(_as_f32(q, self.dim, "q"))
        M = q.shape[0]
        kk = min(k, self._n)
        scores = torch.full((M, k), float("-inf"))
        ids = torch.full((M, k), -1, dtype=torch.int64)
        if kk:
            s, i = (q @ self._buf[: self._n].T).topk(kk, dim=-1)  # [M, kk]
            scores[:, :kk], ids[:, :kk] = s, i
        self._record(M, 1.0)
        return scores, ids


class _FaissIndex(KeyIndex):
    def __init__(self, dim: int, use_gpu: bool | None = None) -> None:
        super().__init__(dim)
        self.use_gpu = gpu_available() if use_gpu is None else bool(use_gpu)
        if self.use_gpu and not gpu_available():
            raise ValueError("use_gpu=True needs a faiss build with a GPU and a visible GPU; this one has none")
        self._gpu_res = faiss.StandardGpuResources() if self.use_gpu else None

    def _to_device(self, index):
        return faiss.index_cpu_to_gpu(self._gpu_res, 0, index) if self.use_gpu else index


@register_index("flat")
class FlatIndex(_FaissIndex):
    """faiss ``IndexFlatIP``: exhaustive, exact."""

    def __init__(self, dim: int, use_gpu: bool | None = None) -> None:
        super().__init__(dim, use_gpu)
        self._index = self._to_device(faiss.IndexFlatIP(dim))

    @property
    def ntotal(self) -> int:
        return self._index.ntotal

    def add(self, x) -> None:
        self._index.add(_as_f32(x, self.dim, "x"))

    def search(self, q, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_k(k)
        q = _as_f32(q, self.dim, "q")
        scores, ids = self._index.search(q, k)
        self._record(q.shape[0], 1.0)
        return _pad_result(scores, ids)


@register_index("ivf")
class IVFIndex(_FaissIndex):
    """faiss ``IndexIVFFlat`` (inner product), trained on the first ``min_train`` vectors added.

    Until then (fewer vectors than ``min_train``) the held vectors are searched exactly.
    """

    def __init__(
        self,
        dim: int,
        nlist: int | None = None,
        nprobe: int = 8,
        min_train: int = 1024,
        niter: int = 10,
        seed: int = 1234,
        use_gpu: bool | None = None,
    ) -> None:
        super().__init__(dim, use_gpu)
        for name, v in (("nprobe", nprobe), ("min_train", min_train), ("niter", niter)):
            check_int(name, v, low=1)
        if nlist is not None:
            check_int("nlist (None: auto)", nlist, low=1)
        self.nlist = nlist
        self.nprobe = nprobe
        self.min_train = min_train
        self.niter = niter
        self.seed = seed
        self._pending = ExactIndex(dim)  # vectors held before training
        self._index: Any = None  # a faiss IndexIVFFlat once trained
        self._list_sizes: np.ndarray = np.zeros(0, dtype=np.int64)  # vectors per inverted list, once trained

    @property
    def ntotal(self) -> int:
        return self._pending.ntotal if self._index is None else self._index.ntotal

    @property
    def is_trained(self) -> bool:
        return self._index is not None

    def _auto_nlist(self, n: int) -> int:
        return max(1, min(self.nlist or int(round(4 * math.sqrt(n))), n))

    def _kmeans(self, x: np.ndarray, nlist: int) -> np.ndarray:
        km = faiss.Kmeans(
            self.dim, nlist, niter=self.niter, seed=self.seed, verbose=False, min_points_per_centroid=1, max_points_per_centroid=256
        )
        km.train(x)
        assert km.centroids is not None  # train() sets them
        return km.centroids

    def _centroids(self, x: np.ndarray) -> np.ndarray:
        """The coarse centroids ``[nlist, D]`` (k-means over the first ``min_train`` vectors)."""
        return self._kmeans(x, self._auto_nlist(x.shape[0]))

    def _probe(self, q: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, lists)`` ``[M, nprobe]``: the lists each query scans (best inner product)."""
        return self._index.quantizer.search(q, nprobe)

    def _build(self, x: np.ndarray) -> None:
        cents = self._centroids(x)
        quantizer = faiss.IndexFlatIP(self.dim)
        quantizer.add(cents)
        index = faiss.IndexIVFFlat(quantizer, self.dim, cents.shape[0], faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        self._quantizer = quantizer  # the IVF index does not own it: keep it alive
        self._index = index
        self._list_sizes = np.zeros(cents.shape[0], dtype=np.int64)
        self._add_trained(x)

    def _add_trained(self, x: np.ndarray) -> None:
        nlist = self._list_sizes.shape[0]
        if x.shape[0] <= nlist:  # a few vectors: count them by their assignment (the one add() makes)
            _, assign = self._index.quantizer.search(x, 1)
            self._index.add(x)
            np.add.at(self._list_sizes, assign.ravel(), 1)
        else:  # many: add, then read the list sizes back (one quantization pass, not two)
            self._index.add(x)
            invlists = self._index.invlists
            self._list_sizes = np.array([invlists.list_size(i) for i in range(nlist)], dtype=np.int64)

    def add(self, x) -> None:
        x = _as_f32(x, self.dim, "x")
        if self._index is not None:
            self._add_trained(x)
            return
        self._pending.add(x)
        if self._pending.ntotal >= self.min_train:
            held = self._pending._buf[: self._pending.ntotal].numpy().copy()
            self._pending = ExactIndex(self.dim)
            self._build(held)

    def search(self, q, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_k(k)
        q = _as_f32(q, self.dim, "q")
        if self._index is None:
            out = self._pending.search(q, k)
            self._record(q.shape[0], 1.0)
            return out
        nlist = self._list_sizes.shape[0]
        nprobe = min(self.nprobe, nlist)
        self._index.nprobe = nprobe
        Dq, Iq = self._probe(q, nprobe)
        scores, ids = self._index.search_preassigned(q, k, Iq, Dq)
        scanned = (self._list_sizes[Iq].sum(1).mean() + nlist) / max(1, self.ntotal)
        self._record(q.shape[0], float(scanned))
        return _pad_result(scores, ids)


@register_index("hnsw")
class HNSWIndex(_FaissIndex):
    """faiss ``IndexHNSWFlat``. CPU only (faiss has no GPU HNSW).

    ``mips_to_l2=True`` (the default) builds the graph on L2 distances after the classic
    MIPS-to-nearest-neighbour reduction: each key gets an
    extra coordinate ``sqrt(M^2 - |k|^2)`` (``M`` = ``norm_margin`` times the largest key norm
    of the first add) and each query a 0, so that ``|q' - k'|^2 = |q|^2 + M^2 - 2 q.k`` ranks keys
    by ``q.k``. A key added later with ``|k| > M`` gets 0 (ranked slightly too low).
    ``mips_to_l2=False`` builds the graph on raw inner products, which recalls far less on real
    keys and queries (``bench/retrieval.py``: 0.58 vs 0.93 top-100 recall at ef=100, 8K keys).
    """

    def __init__(
        self,
        dim: int,
        m: int = 32,
        ef_construction: int = 64,
        ef_search: int = 64,
        mips_to_l2: bool = True,
        norm_margin: float = 1.2,
        use_gpu: bool | None = None,
    ) -> None:
        super().__init__(dim, False)
        for name, v in (("m", m), ("ef_construction", ef_construction), ("ef_search", ef_search)):
            check_int(name, v, low=1)
        if not norm_margin >= 1.0:
            raise ValueError(f"norm_margin must be >= 1, got {norm_margin}")
        self.ef_search = ef_search
        self.mips_to_l2 = bool(mips_to_l2)
        self.norm_margin = float(norm_margin)
        self._max_norm: float | None = None
        if self.mips_to_l2:
            self._index = faiss.IndexHNSWFlat(dim + 1, m, faiss.METRIC_L2)
        else:
            self._index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        self._index.hnsw.efConstruction = ef_construction

    @property
    def ntotal(self) -> int:
        return self._index.ntotal

    def add(self, x) -> None:
        x = _as_f32(x, self.dim, "x")
        if self.mips_to_l2 and x.shape[0]:
            sq = (x.astype(np.float64) ** 2).sum(1)
            if self._max_norm is None:
                self._max_norm = self.norm_margin * float(np.sqrt(sq.max())) or 1.0
            extra = np.sqrt(np.clip(self._max_norm**2 - sq, 0.0, None)).astype(np.float32)
            x = np.ascontiguousarray(np.concatenate([x, extra[:, None]], 1))
        self._index.add(x)

    def search(self, q, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_k(k)
        q = _as_f32(q, self.dim, "q")
        self._index.hnsw.efSearch = max(self.ef_search, k)
        stats = faiss.cvar.hnsw_stats  # type: ignore[attr-defined]  # a SWIG global the stubs do not list
        stats.reset()
        if self.mips_to_l2:
            q2 = np.ascontiguousarray(np.concatenate([q, np.zeros((q.shape[0], 1), np.float32)], 1))
            dist, ids = self._index.search(q2, k)
            scores = ((q.astype(np.float64) ** 2).sum(1, keepdims=True) + (self._max_norm or 0.0) ** 2 - dist) / 2
        else:
            scores, ids = self._index.search(q, k)
        scanned = stats.ndis / max(1, q.shape[0] * self.ntotal)
        self._record(q.shape[0], float(min(1.0, scanned)))
        return _pad_result(scores, ids)
