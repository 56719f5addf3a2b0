"""/v1/retrieve and /v1/attention against a real server (REST and gRPC, sync and async SDKs).

The attention endpoint's ``(o, lse)`` equal a dense float64 torch reference over the same cached
KV (no budget); merged with attention over extra local keys they equal dense attention over the
union; with a budget they equal ``sparse_decode`` over the retriever's selection. Tenants are
isolated; bad input is a 4xx naming the field and changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from pathlib import Path

import httpx
import msgpack
import pytest
import torch

from kvtier.kvstore import KVSpec, chain_hashes
from kvtier.service.client import AsyncKVTierClient, KVTierClient, KVTierError
from kvtier.service.grpc_client import AsyncKVTierGrpcClient, KVTierGrpcClient
from kvtier.sparse_attn import merge_states, sparse_decode

from .conftest import TINY
from .server import ServiceProcess

A, B = "retr-tenant-a-key", "retr-tenant-b-key"
N_BLOCKS = 16  # 256 tokens of TINY (16-token blocks): budget 68 selects a few blocks only
BUDGET = 68  # 4 sinks + 32 recent + 2 pages


@pytest.fixture(scope="module")
def server():
    s = ServiceProcess({"KVTIER_API_KEYS": json.dumps({A: "a", B: "b"})}, grpc=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cached(server):
    """A's chain of N_BLOCKS random blocks, put through REST; (model, tokens, keys, blocks)."""
    torch.manual_seed(0)
    with KVTierClient(server.url, api_key=A) as c:
        model = c.register_spec(TINY)
        tokens = list(range(1000, 1000 + 16 * N_BLOCKS + 5))  # a trailing partial block stays with the engine
        keys = c.hashes(model, tokens)
        blocks = torch.randn(N_BLOCKS, *TINY.block_shape).half()
        assert c.put(model, keys, blocks) == [True] * N_BLOCKS
    return model, tokens, keys, blocks


def _kv(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k, v [L, H_kv, T, D]`` float32 of a chain of blocks ``[N, L, 2, H_kv, BT, D]``."""
    N, L, _, H, BT, D = blocks.shape
    kv = blocks.float().permute(1, 2, 3, 0, 4, 5).reshape(L, 2, H, N * BT, D)
    return kv[:, 0], kv[:, 1]


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 dense decode attention of ``q [L, H_q, D]`` over ``k, v [L, H_kv, T, D]`` (GQA)."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("lhd,lhtd->lht", q.double(), kk) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, -1)
    o = torch.einsum("lht,lhtd->lhd", torch.softmax(s, -1), vv)
    return o.float(), lse.float()


def _q(seed: int, layers: int = TINY.num_layers, heads: int = 4) -> torch.Tensor:
    return torch.randn(layers, heads, TINY.head_dim, generator=torch.Generator().manual_seed(seed)) * 2


def test_attention_equals_dense_reference_and_merges_with_local_keys(server, cached):
    model, tokens, keys, blocks = cached
    k, v = _kv(blocks)
    q = _q(1)
    with KVTierClient(server.url, api_key=A) as c:
        st = c.attention(model, q, hashes=keys)
        by_tokens = c.attention(model, q, token_ids=tokens)
    assert st.o.dtype == st.lse.dtype == torch.float32 and st.o.shape == (2, 4, 8) and st.lse.shape == (2, 4)
    assert st.num_tokens == 16 * N_BLOCKS and st.budget is None and st.fetched == list(range(N_BLOCKS))
    o_ref, lse_ref = _dense(q, k, v)
    torch.testing.assert_close(st.o, o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(st.lse, lse_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(by_tokens.o, st.o, atol=0, rtol=0)

    # the engine's local part (the trailing partial block and the new token): merged, dense over the union
    g = torch.Generator().manual_seed(2)
    k_loc, v_loc = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    o_loc, lse_loc = sparse_decode(q, k_loc, v_loc)
    o, lse = merge_states(st.o, st.lse, o_loc, lse_loc)
    o_all, lse_all = _dense(q, torch.cat([k, k_loc], 2), torch.cat([v, v_loc], 2))
    torch.testing.assert_close(o, o_all, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, lse_all, atol=2e-5, rtol=1e-5)

    # a layer subset and a prefix of the chain
    with KVTierClient(server.url, api_key=A) as c:
        sub = c.attention(model, q[1:], hashes=keys[:5], layers=[1])
    o5, lse5 = _dense(q[1:], k[1:, :, : 16 * 5], v[1:, :, : 16 * 5])
    torch.testing.assert_close(sub.o, o5, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sub.lse, lse5, atol=2e-5, rtol=1e-5)


def test_retrieve_and_sparse_attention_over_the_selection(server, cached):
    model, tokens, keys, blocks = cached
    k, v = _kv(blocks)
    q = _q(3)
    with KVTierClient(server.url, api_key=A) as c:
        r = c.retrieve(model, q, BUDGET, hashes=keys)
        st = c.attention(model, q, budget=BUDGET, hashes=keys)
    T = 16 * N_BLOCKS
    assert r.token_ids.dtype == torch.int64 and r.token_ids.shape == (2, 2, BUDGET) and r.num_tokens == T
    assert r.summarized == 0  # the put path computed the summaries
    for row in r.token_ids.reshape(-1, BUDGET).tolist():
        ids = [t for t in row if t >= 0]
        assert ids == sorted(set(ids)) and row[len(ids) :] == [-1] * (BUDGET - len(ids)) and len(ids) <= BUDGET
        assert set(range(4)) <= set(ids) and set(range(T - 32, T)) <= set(ids)  # sinks and recent window
    need = sorted({t // 16 for t in r.token_ids[r.token_ids >= 0].tolist()})
    assert r.fetched == need and len(need) < N_BLOCKS  # only the blocks holding selected tokens were read
    assert st.fetched == need and st.budget == BUDGET
    o_ref, lse_ref = sparse_decode(q, k, v, r.token_ids)
    torch.testing.assert_close(st.o, o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(st.lse, lse_ref, atol=2e-5, rtol=1e-5)
    # the selection is a subset: its softmax mass is at most the dense one
    assert bool((st.lse <= _dense(q, k, v)[1] + 1e-5).all())


def test_grpc_and_async_clients_agree(server, cached):
    model, tokens, keys, _ = cached
    q = _q(4)
    with KVTierClient(server.url, api_key=A) as c:
        r0, a0, d0 = (
            c.retrieve(model, q, BUDGET, hashes=keys),
            c.attention(model, q, budget=BUDGET, hashes=keys),
            c.attention(model, q, hashes=keys),
        )
    with KVTierGrpcClient(server.grpc_target, api_key=A) as g:
        g.register_spec(TINY)
        r1, a1, d1 = (
            g.retrieve(model, q, BUDGET, hashes=keys),
            g.attention(model, q, budget=BUDGET, hashes=keys),
            g.attention(model, q, token_ids=tokens),
        )

    async def run():
        async with AsyncKVTierClient(server.url, api_key=A) as ac:
            ra, aa = await ac.retrieve(model, q, BUDGET, token_ids=tokens), await ac.attention(model, q, hashes=keys)
        async with AsyncKVTierGrpcClient(server.grpc_target, api_key=A) as ag:
            await ag.register_spec(TINY)
            rg, ag_ = await ag.retrieve(model, q, BUDGET, hashes=keys), await ag.attention(model, q, budget=BUDGET, hashes=keys)
        return ra, aa, rg, ag_

    ra, aa, rg, ag_ = asyncio.run(run())
    for r in (r1, ra, rg):
        assert torch.equal(r.token_ids, r0.token_ids) and r.fetched == r0.fetched and r.num_tokens == r0.num_tokens
    for a, ref in ((a1, a0), (ag_, a0), (d1, d0), (aa, d0)):
        assert torch.equal(a.o, ref.o) and torch.equal(a.lse, ref.lse) and a.budget == ref.budget


def test_tenant_b_neither_reads_nor_detects_a(server, cached):
    model, tokens, keys, _ = cached
    q = _q(5)
    with KVTierClient(server.url, api_key=B) as c, KVTierGrpcClient(server.grpc_target, api_key=B) as g:
        assert c.register_spec(TINY) == model and g.register_spec(TINY) == model
        for res in (
            c.retrieve(model, q, BUDGET, hashes=keys),
            c.retrieve(model, q, BUDGET, token_ids=tokens),
            g.retrieve(model, q, BUDGET, hashes=keys),
        ):
            assert res.num_tokens == res.num_blocks == 0 and res.fetched == [] and bool((res.token_ids == -1).all())
        for st in (
            c.attention(model, q, hashes=keys),
            c.attention(model, q, budget=BUDGET, token_ids=tokens),
            g.attention(model, q, hashes=keys),
        ):
            assert st.num_tokens == 0 and st.fetched == [] and not st.o.any() and bool(torch.isneginf(st.lse).all())


def test_bad_input_is_a_4xx_naming_the_field_and_changes_nothing(server, cached):
    model, tokens, keys, _ = cached
    q = _q(6)
    hk = [k.hex() for k in keys]
    with (
        KVTierClient(server.url, api_key=A) as c,
        KVTierGrpcClient(server.grpc_target, api_key=A) as g,
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {A}"}) as http,
    ):
        g.register_spec(TINY)
        before, last = c.stats(), c.events(limit=10_000)["next_after"]
        cases = [  # (call, status, field)
            (lambda: c.retrieve(model, q[:1], BUDGET, hashes=keys), 400, "q.shape"),  # one query for two layers
            (lambda: c.attention(model, _q(6, heads=3), hashes=keys), 400, "q.shape"),  # not a multiple of H_kv
            (lambda: c.attention(model, q.int(), hashes=keys), 400, "q.dtype"),
            (lambda: c.attention(model, torch.full_like(q, float("nan")), hashes=keys), 400, "q.data"),
            (lambda: c.retrieve(model, q, 35, hashes=keys), 400, "budget"),  # under sinks + recent
            (lambda: c.retrieve(model, q, 10**9, hashes=keys), 400, "budget"),  # over max_retrieve_budget
            (lambda: c.attention(model, q, budget=BUDGET, hashes=keys, layers=[0, 0]), 400, "layers"),
            (lambda: c.attention(model, q, hashes=keys, layers=[0, 2]), 400, "layers[1]"),
            (lambda: c.retrieve(model, q, BUDGET, hashes=[b"x" * 31]), 422, "hashes.0"),
            (lambda: c.retrieve("0" * 64, q, BUDGET, hashes=keys), 404, "model"),
            (lambda: g.retrieve(model, q, 0, hashes=keys), 400, "budget"),
            (lambda: g.attention(model, q[:, :, :7], hashes=keys), 400, "q.shape"),
            (lambda: g.retrieve(model, q, BUDGET, hashes=[b"x" * 31]), 400, "hashes[0]"),
        ]
        for call, status, field in cases:
            with pytest.raises(KVTierError) as e:
                call()
            assert (e.value.status, e.value.field) == (status, field), (e.value, field)
        q_json = {"dtype": "float32", "shape": list(q.shape), "data": base64.b64encode(q.numpy().tobytes()).decode()}
        raw = [
            (http.post("/v1/retrieve", json={"model": model, "hashes": hk, "q": q_json}), 422, "budget"),  # required
            (http.post("/v1/attention", json={"model": model, "hashes": hk, "token_ids": tokens, "q": q_json}), 400, "token_ids"),
            (http.post("/v1/attention", content=b"\x81\xc1", headers={"content-type": "application/msgpack"}), 400, "body"),
            (http.post("/v1/attention", content=b"{}", headers={"content-type": "text/plain"}), 415, "content-type"),
            (http.post("/v1/attention", json={"model": model, "hashes": hk, "q": {**q_json, "data": "%%%"}}), 400, "q.data"),
            (http.post("/v1/attention", json={"model": model, "hashes": hk, "q": {**q_json, "extra": 1}}), 422, "q.extra"),
        ]
        for r, status, field in raw:
            assert (r.status_code, r.json()["error"]["field"]) == (status, field), r.text
        # JSON in, JSON out (base64 tensors): the same answer as msgpack
        r = http.post("/v1/retrieve", json={"model": model, "hashes": hk, "q": q_json, "budget": BUDGET})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
        t = r.json()["token_ids"]
        ids = torch.frombuffer(bytearray(base64.b64decode(t["data"])), dtype=torch.int64).view(t["shape"])
        assert torch.equal(ids, c.retrieve(model, q, BUDGET, hashes=keys).token_ids)
        r = http.post("/v1/attention", json={"model": model, "hashes": hk, "q": q_json}, headers={"accept": "application/msgpack"})
        assert r.headers["content-type"] == "application/msgpack" and msgpack.unpackb(r.content)["num_tokens"] == 16 * N_BLOCKS
        assert c.stats()["bytes"] == before["bytes"] and c.events(after=last)["events"] == []
        assert c.lookup(model, hashes=keys).num_blocks == N_BLOCKS


def test_summaries_are_bounded_and_retrieval_recomputes_dropped_ones(tmp_path: Path):
    """In process: the put path feeds the summaries within summary_capacity_bytes; a dropped one is recomputed."""
    from kvtier.service.core import open_service
    from kvtier.service.settings import Settings
    from kvtier.service.tenancy import Principal

    spec = KVSpec("tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)
    one = 3 * 2 * 2 * 1 * 8 * 2  # kmin, kmax, kmean: [L, H_kv, 1 page, D] float16
    svc = open_service(Settings(data_dir=tmp_path, grpc_port=None, summary_capacity_bytes=4 * one))
    try:
        p = Principal("t")
        model, _ = svc.register_spec(p, spec.to_dict())
        keys = chain_hashes(spec, list(range(16 * 10)))
        blocks = list(torch.randn(10, *spec.block_shape, generator=torch.Generator().manual_seed(0)).half())
        svc.put(p, model, keys, blocks)
        s = svc.retriever.summaries
        assert len(s) == 4 and s.used_bytes <= 4 * one  # the last four: the LRU bound holds
        q = _q(7)
        res = svc.retrieve(p, model, q=q, budget=36 + 16, hashes=keys)
        assert res["summarized"] == 6 and res["num_tokens"] == 160 and s.used_bytes <= 4 * one
        st = svc.attention(p, model, q=q, budget=36 + 16, hashes=keys)
        k, v = _kv(torch.stack(blocks))
        o_ref, lse_ref = sparse_decode(q, k, v, res["token_ids"])
        torch.testing.assert_close(st["o"], o_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(st["lse"], lse_ref, atol=2e-5, rtol=1e-5)
        assert svc.delete(p, model, keys[:2]) == 2 and len(s) <= 4 and keys[0] not in s
    finally:
        svc.close()


# -- blocks stored page-addressable: /v1/attention reads only the selected pages ---------------------
def test_attention_reads_pages_when_blocks_are_stored_paged():
    paged = {
        "KVTIER_API_KEYS": json.dumps({A: "a"}),
        "KVTIER_DEVICE_CAPACITY_BYTES": "0",
        "KVTIER_HOST_CODEC": "paged",
        "KVTIER_DISK_CODEC": "paged",
    }
    s = ServiceProcess(paged, grpc=True)
    try:
        torch.manual_seed(1)
        with KVTierClient(s.url, api_key=A) as c:
            model = c.register_spec(TINY)
            tokens = list(range(2000, 2000 + 16 * N_BLOCKS))
            keys = c.hashes(model, tokens)
            blocks = torch.randn(N_BLOCKS, *TINY.block_shape).half()
            assert c.put(model, keys, blocks) == [True] * N_BLOCKS
            q = _q(5)
            k, v = _kv(blocks)
            full = c.attention(model, q, budget=16 * N_BLOCKS, hashes=keys)  # a budget covering the chain: dense
            o_ref, lse_ref = _dense(q, k, v)
            torch.testing.assert_close(full.o, o_ref, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(full.lse, lse_ref, atol=2e-5, rtol=1e-5)
            st = c.attention(model, q, budget=48, hashes=keys)  # 3 pages per KV head
            assert st.attended == 48 and 1 <= len(st.fetched) <= 2 * 2 * 3 and st.fetched[0] == 0  # the sink page's block
            assert bool((st.lse <= lse_ref + 1e-5).all())
        with KVTierGrpcClient(s.grpc_target, api_key=A) as g:
            g.register_spec(TINY)
            gs = g.attention(model, q, budget=48, hashes=keys)
            torch.testing.assert_close(gs.o, st.o) and torch.testing.assert_close(gs.lse, st.lse)
    finally:
        s.stop()
