"""The gRPC API against a real server (REST and gRPC in one process), and the generated code is current."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from kvtier.kvstore import KVSpec, Namespace, chain_hashes
from kvtier.service.client import KVTierClient, KVTierError
from kvtier.service.grpc_client import AsyncKVTierGrpcClient, KVTierGrpcClient

from .conftest import TINY
from .server import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
A, B = "grpc-tenant-a-key", "grpc-tenant-b-key"


def _blocks(n: int, spec: KVSpec = TINY, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *spec.block_shape, generator=torch.Generator().manual_seed(seed)).to(spec.torch_dtype)


@pytest.fixture(scope="module")
def server():
    s = ServiceProcess({"KVTIER_API_KEYS": json.dumps({A: "a", B: "b"}), "KVTIER_DISK_CAPACITY_BYTES": "64MiB"}, grpc=True)
    yield s
    s.stop()


def test_grpc_roundtrip_and_rest_agree(server):
    with KVTierGrpcClient(server.grpc_target, api_key=A) as g, KVTierClient(server.url, api_key=A) as r:
        model = g.register_spec(TINY)
        tokens = list(range(16 * 4 + 3))
        keys = g.hashes(model, tokens)
        assert keys == r.hashes(model, tokens) and len(keys) == 4
        blocks = _blocks(4, seed=1)
        assert g.put(model, keys[:3], blocks[:3]) == [True] * 3
        hit = g.lookup(model, token_ids=tokens)
        assert (hit.num_blocks, hit.num_tokens, hit.num_requested_blocks) == (3, 48, 4)
        assert g.lookup(model, hashes=keys).tier_hits == r.lookup(model, hashes=keys).tier_hits
        got = g.get(model, keys)
        assert got[3] is None and all(torch.equal(x, y) for x, y in zip(got[:3], blocks[:3]))
        assert all(torch.equal(x, y) for x, y in zip(r.get(model, keys[:3]), blocks[:3]))  # put by gRPC, read by REST
        lease = g.pin(model, keys, ttl_s=5)
        assert lease["num_pinned"] == 3 and g.unpin(lease["lease_id"])
        assert g.stats()["bytes"] == 3 * TINY.block_nbytes
        assert len([e for e in g.events()["events"] if e["kind"] == "stored"]) >= 3
        assert g.delete(model, keys[2:3]) == 1
        assert g.lookup(model, hashes=keys).num_blocks == 2
        assert g.health()["ready"]


def test_grpc_streams_large_blocks(server):
    spec = KVSpec("big", num_layers=8, num_kv_heads=8, head_dim=64, dtype="float16", block_tokens=256)  # 4 MiB: > gRPC's 4 MB default
    with KVTierGrpcClient(server.grpc_target, api_key=A) as g:
        model = g.register_spec(spec)
        keys = chain_hashes(spec, list(range(256 * 3)), Namespace(salt="big"))
        blocks = _blocks(3, spec, seed=2)
        assert g.put(model, keys, blocks) == [True] * 3
        assert all(torch.equal(x, y) for x, y in zip(g.get(model, keys), blocks))


def test_grpc_async_client(server):
    async def run():
        async with AsyncKVTierGrpcClient(server.grpc_target, api_key=B) as g:
            model = await g.register_spec(TINY)
            keys = await g.hashes(model, list(range(32)))
            blocks = _blocks(2, seed=3)
            assert await g.put(model, keys, blocks) == [True, True]
            got = await g.get(model, keys)
            assert all(torch.equal(x, y) for x, y in zip(got, blocks))
            assert (await g.lookup(model, hashes=keys)).num_blocks == 2

    asyncio.run(run())


def test_grpc_errors_and_tenants(server):
    with KVTierGrpcClient(server.grpc_target, api_key=A, retries=0) as a, KVTierGrpcClient(server.grpc_target, api_key=B) as b:
        model = a.register_spec(TINY)
        b.register_spec(TINY)
        keys = chain_hashes(TINY, list(range(48)), Namespace(salt="iso"))
        a.put(model, keys, _blocks(3, seed=4))
        assert b.lookup(model, hashes=keys).num_blocks == 0
        assert b.get(model, keys) == [None] * 3
        assert b.delete(model, keys) == 0
        assert a.lookup(model, hashes=keys).num_blocks == 3

        with pytest.raises(KVTierError) as e:
            a.lookup("nope", token_ids=[1])
        assert e.value.code == "NOT_FOUND" and e.value.field == "model"
        with pytest.raises(KVTierError) as e:
            a.lookup(model, hashes=[b"short"])
        assert e.value.code == "INVALID_ARGUMENT" and e.value.field == "hashes[0]"
        with pytest.raises(KVTierError) as e:
            a.pin(model, keys, ttl_s=-1)
        assert e.value.code == "INVALID_ARGUMENT" and e.value.field == "ttl_s"
        bad = KVSpec("tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=16)
        a._specs[model] = bad  # frames of another spec
        with pytest.raises(KVTierError) as e:
            a.put(model, keys[:1], _blocks(1, bad))
        assert e.value.code == "INVALID_ARGUMENT" and e.value.field == "frames[0]"
    with KVTierGrpcClient(server.grpc_target, api_key="wrong-key-000", retries=0) as c:
        with pytest.raises(KVTierError) as e:
            c.stats()
        assert e.value.code == "UNAUTHENTICATED"


@pytest.mark.skipif(shutil.which("true") is None, reason="posix")
def test_generated_code_is_current(tmp_path):
    """The committed gRPC code is exactly what the locked grpcio-tools generates (tools/gen_proto.py)."""
    pytest.importorskip("grpc_tools")
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "tools" / "gen_proto.py")
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    for name, text in gen_proto.generate(tmp_path).items():
        assert text == (ROOT / "service/proto" / name).read_text(), (
            f"service/proto/{name} is stale: regenerate it with python tools/gen_proto.py"
        )


def test_grpc_malformed_requests_are_refused_not_crashed(server):
    """Random bytes as frames, bad hashes and fields, unknown models: a client error status, never INTERNAL/UNKNOWN."""
    import random

    import grpc

    from kvtier.service.proto import kvtier_pb2 as pb
    from kvtier.service.proto import kvtier_pb2_grpc as pb_grpc

    rng = random.Random(7)
    md = (("authorization", f"Bearer {A}"),)
    with KVTierGrpcClient(server.grpc_target, api_key=A) as g, grpc.insecure_channel(server.grpc_target) as ch:
        model = g.register_spec(TINY)
        keys = chain_hashes(TINY, list(range(32)), Namespace(salt="grpc-fuzz"))
        g.put(model, keys, _blocks(2, seed=8))
        before = g.stats()["bytes"]
        stub = pb_grpc.KVTierStub(ch)
        calls = []
        for _ in range(40):
            calls += [
                lambda: stub.PutBlocks(iter([pb.PutRequest(model=model, frame=rng.randbytes(rng.randrange(0, 3000)))]), metadata=md),
                lambda: stub.PutBlocks(
                    iter([pb.PutRequest(model=model, parent=rng.randbytes(rng.choice([1, 31, 33])), frame=b"x")]), metadata=md
                ),
                lambda: stub.PutBlocks(iter([]), metadata=md),
                lambda: stub.PutBlocks(iter([pb.PutRequest(model=rng.randbytes(8).hex(), frame=b"x")]), metadata=md),
                lambda: stub.Lookup(pb.LookupRequest(model=model, hashes=[rng.randbytes(rng.choice([0, 5, 31, 64]))]), metadata=md),
                lambda: stub.Lookup(pb.LookupRequest(model=model, token_ids=[1], extra_keys=["k"] * 17), metadata=md),
                lambda: list(stub.GetBlocks(pb.KeysRequest(model=model, keys=[rng.randbytes(3)]), metadata=md)),
                lambda: list(stub.GetBlocks(pb.KeysRequest(model=model, keys=[]), metadata=md)),
                lambda: stub.Pin(
                    pb.PinRequest(model=model, keys=[keys[0]], ttl_s=rng.choice([0.0, -1.0, 1e12, float("nan")])), metadata=md
                ),
                lambda: stub.Unpin(pb.UnpinRequest(lease_id=rng.randrange(10**6, 2**63)), metadata=md),
                lambda: stub.Events(pb.EventsRequest(after=2**63, limit=rng.randrange(10**6, 2**32)), metadata=md),
                lambda: stub.RegisterSpec(pb.Spec(model_id="", num_layers=0), metadata=md),
                lambda: stub.RegisterSpec(pb.Spec(model_id="m", num_layers=4096, num_kv_heads=4096, head_dim=4096), metadata=md),
                lambda: stub.Stats(pb.StatsRequest(), metadata=(("authorization", "Bearer nope-nope-nope"),)),
            ]
        refused = {"INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"}
        codes = {}
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call()
            codes[e.value.code().name] = codes.get(e.value.code().name, 0) + 1
            assert e.value.code().name in refused, (e.value.code(), e.value.details())
        assert len(calls) >= 500
        assert g.stats()["bytes"] == before and g.lookup(model, hashes=keys).num_blocks == 2
        assert g.health()["ready"]
