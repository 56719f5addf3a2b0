"""The REST API end to end, against a real ``kvtier serve`` process, through the SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import msgpack
import numpy as np
import pytest
import torch

from kvtier.kvstore import KVSpec, Namespace, chain_hashes, decode_frame
from kvtier.service import wire
from kvtier.service.client import AsyncKVTierClient, KVTierClient, KVTierError, encode_blocks

from .conftest import TINY
from .server import ServiceProcess


def _blocks(n: int, spec: KVSpec = TINY, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *spec.block_shape, generator=g).to(spec.torch_dtype)  # [N, L, 2, H_kv, T, D]


def _tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


@pytest.fixture
def client(open_server):
    with KVTierClient(open_server.url) as c:
        yield c


def test_roundtrip_lookup_get_delete(client):
    model = client.register_spec(TINY)
    assert client.register_spec(TINY) == model == TINY.fingerprint.hex()  # idempotent, deterministic
    tokens = _tokens(16 * 5 + 7, seed=1)  # 5 full blocks and a partial one
    keys = client.hashes(model, tokens)
    assert len(keys) == 5
    blocks = _blocks(5)
    assert client.lookup(model, token_ids=tokens).num_blocks == 0
    assert client.put(model, keys[:3], blocks[:3]) == [True] * 3

    hit = client.lookup(model, token_ids=tokens)
    assert (hit.num_blocks, hit.num_tokens, hit.num_requested_blocks) == (3, 48, 5)
    assert sum(hit.tier_hits.values()) == 3 and hit.tier_prefix["device"] == 3
    assert client.lookup(model, hashes=keys).num_blocks == 3

    got = client.get(model, keys)
    assert [g is None for g in got] == [False, False, False, True, True]
    for g, b in zip(got[:3], blocks[:3]):
        assert g.shape == TINY.block_shape and g.dtype == torch.float16 and torch.equal(g, b)

    long_chain = chain_hashes(TINY, _tokens(16 * 500, seed=13))  # lookups by hash take whole long chains
    assert client.put(model, long_chain[:40], _blocks(40, seed=13)) == [True] * 40
    assert client.lookup(model, hashes=long_chain).num_blocks == 40

    assert client.delete(model, keys[1:2]) == 1
    assert client.lookup(model, hashes=keys).num_blocks == 1  # the prefix stops at the hole
    assert client.get(model, keys[1:2]) == [None]


def test_async_client(open_server):
    async def run():
        async with AsyncKVTierClient(open_server.url) as c:
            model = await c.register_spec(TINY)
            tokens = _tokens(64, seed=2)
            keys = await c.hashes(model, tokens)
            blocks = _blocks(4, seed=2)
            results = await asyncio.gather(*(c.put(model, [k], blocks[i : i + 1]) for i, k in enumerate(keys)))
            assert results == [[True]] * 4
            got = await c.get(model, keys)
            assert all(torch.equal(g, b) for g, b in zip(got, blocks))
            assert (await c.lookup(model, token_ids=tokens)).num_blocks == 4

    asyncio.run(run())


def test_namespace_salt_and_extra_keys_separate_chains(client):
    model = client.register_spec(TINY)
    tokens = _tokens(32, seed=3)
    plain = client.hashes(model, tokens)
    salted = client.hashes(model, tokens, salt="s1")
    lora = client.hashes(model, tokens, extra_keys=["lora-7"])
    assert len({plain[0], salted[0], lora[0]}) == 3
    client.put(model, salted, _blocks(2, seed=3))
    assert client.lookup(model, token_ids=tokens, salt="s1").num_blocks == 2
    assert client.lookup(model, token_ids=tokens).num_blocks == 0


def test_client_chain_hashes_are_accepted_as_keys(client):
    """Client keys may be computed locally (any chain); the server stores them in the caller's key space."""
    model = client.register_spec(TINY)
    keys = chain_hashes(TINY, _tokens(48, seed=4), Namespace(salt="local"))
    assert client.put(model, keys, _blocks(3, seed=4)) == [True] * 3
    assert client.lookup(model, hashes=keys).num_blocks == 3


def test_streamed_get_of_many_blocks_and_raw_wire_format(open_server, client):
    """The answer of a get is a msgpack stream any decoder reads: bin frames and nil for misses."""
    spec = KVSpec("wide", num_layers=4, num_kv_heads=4, head_dim=32, dtype="bfloat16", block_tokens=64)  # 128 KiB blocks
    model = client.register_spec(spec)
    keys = chain_hashes(spec, _tokens(64 * 12, seed=5))
    blocks = _blocks(12, spec, seed=5)
    assert all(client.put(model, keys, blocks))
    asked = keys + [bytes(32)]
    with httpx.stream("POST", open_server.url + "/v1/blocks/get", json={"model": model, "keys": [k.hex() for k in asked]}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith(wire.FRAMES_MEDIA_TYPE)
        unpacker = msgpack.Unpacker(max_buffer_size=64 << 20)
        items = []
        for chunk in r.iter_bytes():
            unpacker.feed(chunk)
            items.extend(unpacker)
    assert len(items) == 13 and items[-1] is None
    for k, item, b in zip(keys, items, blocks):
        frame = decode_frame(item, expect_key=k, expect_spec=spec)
        assert bytes(frame.data) == b.view(torch.uint8).numpy().tobytes()


def test_pins_and_unpin(client):
    model = client.register_spec(TINY)
    keys = chain_hashes(TINY, _tokens(32, seed=6), Namespace(salt="pins"))
    client.put(model, keys, _blocks(2, seed=6))
    lease = client.pin(model, keys + [bytes(32)], ttl_s=30)
    assert lease["num_pinned"] == 2
    assert client.unpin(lease["lease_id"]) is True
    with pytest.raises(KVTierError) as e:
        client.unpin(lease["lease_id"])
    assert e.value.status == 404 and e.value.field == "lease_id"
    with pytest.raises(KVTierError) as e:
        client.pin(model, keys, ttl_s=10**9)
    assert e.value.status == 400 and e.value.field == "ttl_s"


def test_events_and_stats(client):
    model = client.register_spec(TINY)
    after = client.events(limit=1)["next_after"]
    start = client.stats()["last_event_id"]
    keys = chain_hashes(TINY, _tokens(16, seed=7), Namespace(salt="ev"))
    client.put(model, keys, _blocks(1, seed=7))
    evs = client.events(after=start)["events"]
    assert any(e["kind"] == "stored" and e["model"] == model for e in evs)
    assert all(e["id"] > start for e in evs) and after >= 0
    s = client.stats()
    assert {t["name"] for t in s["tiers"]} == {"device", "host", "disk"}
    assert all(t["bytes"] <= t["capacity_bytes"] for t in s["tiers"])


def test_errors_name_the_field_and_store_nothing(open_server, client):
    model = client.register_spec(TINY)
    url = open_server.url
    cases = [
        ("POST", "/v1/lookup", {"model": model, "token_ids": [1, -1]}, 422, "token_ids.1"),
        ("POST", "/v1/lookup", {"model": model, "token_ids": [1], "hashes": ["00" * 32]}, 400, "token_ids"),
        ("POST", "/v1/lookup", {"model": model}, 400, "token_ids"),
        ("POST", "/v1/lookup", {"model": "nope", "token_ids": [1]}, 404, "model"),
        ("POST", "/v1/lookup", {"model": model, "hashes": ["zz"]}, 422, "hashes.0"),
        ("POST", "/v1/lookup", {"model": model, "token_ids": [1], "bogus": 1}, 422, "bogus"),
        (
            "POST",
            "/v1/specs",
            {"model_id": "m", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_tokens": 17},
            400,
            "spec.block_tokens",
        ),
        ("POST", "/v1/specs", {"model_id": "m", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "int3"}, 400, "spec.dtype"),
        ("POST", "/v1/specs", {"model_id": "m", "num_layers": 0, "num_kv_heads": 2, "head_dim": 8}, 422, "num_layers"),
        ("POST", "/v1/blocks/get", {"model": model, "keys": []}, 422, "keys"),
        ("POST", "/v1/blocks/get", {"model": model, "keys": ["00" * 32] * 65}, 413, "keys"),
        ("POST", "/v1/pins", {"model": model, "keys": ["00" * 32], "ttl_s": 0}, 422, "ttl_s"),
        ("GET", "/v1/events?after=-1", None, 422, "query.after"),
    ]
    before = client.stats()
    for method, path, body, status, field in cases:
        r = httpx.request(method, url + path, json=body)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["error"]["field"] == field, (path, body, r.text)

    # bad frames in a put: 400 naming the frame, and none of the batch stored
    keys = chain_hashes(TINY, _tokens(48, seed=8), Namespace(salt="bad"))
    good = encode_blocks(TINY, keys[:2], _blocks(2, seed=8))
    other = KVSpec("tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=16)
    wrong = encode_blocks(other, keys[2:], _blocks(1, other, seed=8))
    corrupt = bytearray(b"".join(encode_blocks(TINY, keys[2:], _blocks(1, seed=9))))
    corrupt[-5] ^= 0xFF
    for body, field in [
        (b"".join(good + wrong), "frames[2]"),
        (b"".join(good) + bytes(corrupt), "frames[2]"),
        (b"".join(good)[:-10], "frames[1]"),
        (b"".join(good + good[:3]), "frames[2].key"),
        (b"\x93\x01\x02\x03", "frames[0]"),
        (b"", "frames"),
    ]:
        r = httpx.put(url + "/v1/blocks", params={"model": model}, content=body)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (field, r.text)
    assert client.lookup(model, hashes=keys).num_blocks == 0
    after = client.stats()
    assert [t["bytes"] for t in after["tiers"]] == [t["bytes"] for t in before["tiers"]]


def test_body_limits(open_server, client):
    model = client.register_spec(TINY)
    r = httpx.post(open_server.url + "/v1/lookup", content=b"{" + b" " * (17 << 20) + b"}")
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    chunked = httpx.post(open_server.url + "/v1/specs", content=iter([b"{" + b" " * (1 << 20)] * 17 + [b"}"]))  # no Content-Length
    assert chunked.status_code == 413 and chunked.json()["error"]["field"] == "body"
    assert client.lookup(model, token_ids=[1] * 32).num_blocks == 0
    r = httpx.post(open_server.url + "/v1/lookup", json={"model": model, "token_ids": [1] * ((1 << 20) + 1)})
    assert r.status_code == 413 and r.json()["error"]["field"] == "token_ids"


def test_health_ready_metrics_docs(open_server, client):
    url = open_server.url
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(url + "/readyz")
    assert r.status_code == 200 and r.json()["tiers"] == {"device": "ok", "host": "ok", "disk": "ok"}
    model = client.register_spec(TINY)
    client.lookup(model, token_ids=_tokens(32, seed=10))
    text = httpx.get(url + "/metrics").text
    for name in (
        "kvtier_tier_hits_total",
        "kvtier_tier_misses_total",
        "kvtier_tier_bytes",
        "kvtier_tier_evictions_total",
        "kvtier_corrupt_frames_total",
        "kvtier_redis_errors_total",
        "kvtier_request_duration_seconds_bucket",
        "kvtier_lookup_blocks_total",
        "kvtier_write_through_pending",
        "kvtier_write_through_retried_total",
    ):
        assert name in text, name
    assert 'op="POST /v1/lookup"' in text
    assert httpx.get(url + "/docs").status_code == 200
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    assert {
        "/v1/specs",
        "/v1/lookup",
        "/v1/blocks",
        "/v1/blocks/get",
        "/v1/blocks/delete",
        "/v1/pins",
        "/v1/pins/{lease_id}",
        "/v1/stats",
        "/v1/events",
    } <= set(paths)


def test_disk_tier_survives_restart_and_shutdown_is_graceful():
    """SIGTERM lets an in-flight upload finish; the disk tier and the specs are found again after a restart."""
    srv = ServiceProcess({"KVTIER_DEVICE_CAPACITY_BYTES": "0", "KVTIER_HOST_CAPACITY_BYTES": "0", "KVTIER_DISK_CAPACITY_BYTES": "64MiB"})
    try:
        spec = KVSpec("big", num_layers=8, num_kv_heads=4, head_dim=64, dtype="float16", block_tokens=256)  # 2 MiB blocks
        with KVTierClient(srv.url) as c:
            model = c.register_spec(spec)
            keys = chain_hashes(spec, _tokens(256 * 16, seed=11))
            blocks = _blocks(16, spec, seed=11)
            result = {}

            pieces = encode_blocks(spec, keys, blocks)
            size = sum(len(x) if isinstance(x, bytes) else x.nbytes for x in pieces)

            def slow_body():  # ~1.5 s of upload: surely in flight when SIGTERM comes
                for piece in pieces:
                    time.sleep(0.03)
                    yield bytes(piece)

            def upload():
                r = httpx.put(
                    srv.url + "/v1/blocks",
                    params={"model": model},
                    content=slow_body(),
                    timeout=60,
                    headers={"content-length": str(size), "content-type": wire.FRAMES_MEDIA_TYPE},
                )
                result["status"], result["stored"] = r.status_code, r.json().get("stored")

            t = threading.Thread(target=upload)
            t.start()
            time.sleep(0.5)
            assert t.is_alive()  # the upload is in flight
            srv.stop()
            t.join(30)
            assert result.get("status") == 200 and result.get("stored") == [True] * 16
        srv.start()
        with KVTierClient(srv.url) as c:
            assert c.lookup(model, hashes=keys).num_blocks == 16  # no re-registration needed
            got = c.get(model, keys[:2])
            assert all(torch.equal(g, b) for g, b in zip(got, blocks[:2]))
    finally:
        srv.stop()


def test_lookup_fast_path_answers_as_the_route(open_server, client):
    """Well-formed lookups are answered by a lean ASGI path; the FastAPI route (taken by a chunked body
    here) must give the very same answers, errors included."""
    model = client.register_spec(TINY)
    tokens = _tokens(16 * 3, seed=12)
    keys = client.hashes(model, tokens)
    client.put(model, keys[:2], _blocks(2, seed=12))
    bodies = [
        {"model": model, "token_ids": tokens, "return_keys": True},
        {"model": model, "hashes": [k.hex() for k in keys]},
        {"model": model, "token_ids": tokens, "salt": "x", "extra_keys": ["a"]},
        {"model": "nope", "token_ids": [1]},
        {"model": model, "hashes": ["zz" * 32]},
    ]
    import json as _json

    for body in bodies:
        data = _json.dumps(body).encode()
        fast = httpx.post(open_server.url + "/v1/lookup", content=data, headers={"content-type": "application/json"})
        routed = httpx.post(open_server.url + "/v1/lookup", content=iter([data]), headers={"content-type": "application/json"})
        assert "content-length" not in routed.request.headers  # chunked: not the fast path
        assert (fast.status_code, fast.json()) == (routed.status_code, routed.json()), body
