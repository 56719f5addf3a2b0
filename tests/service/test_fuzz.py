"""Fuzz: well over 1,000 malformed requests against a live server.

Every one must get a 4xx (never a 5xx, never a dropped connection), the server must stay up,
and the store must be exactly as it was: same bytes and blocks per tier, no event emitted, the
blocks stored before still there bit for bit. Valid-but-unknown block hashes are no error: they
must answer a miss and change nothing either.
"""

from __future__ import annotations

import json
import random

import httpx
import msgpack
import pytest
import torch

from kvtier.kvstore import KVSpec, chain_hashes, encode_frame
from kvtier.kvstore.codecs.base import tensor_bytes
from kvtier.service import wire
from kvtier.service.client import KVTierClient

from .conftest import TINY
from .server import ServiceProcess

KEY = "fuzz-tenant-key-01"
OTHER = KVSpec("tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=16)


@pytest.fixture(scope="module")
def server():
    s = ServiceProcess(
        {"KVTIER_API_KEYS": json.dumps({KEY: "fuzz"}), "KVTIER_MAX_REQUEST_BYTES": "1MiB", "KVTIER_MAX_JSON_BYTES": "256KiB"}
    )
    yield s
    s.stop()


def _frame(key: bytes, spec: KVSpec = TINY, shape=None, dtype=None, codec="identity", data=None, meta=None) -> bytes:
    block = torch.zeros(spec.block_shape, dtype=spec.torch_dtype)
    payload = tensor_bytes(block) if data is None else data
    return encode_frame(
        key, spec, codec, meta or {}, spec.block_shape if shape is None else shape, spec.dtype if dtype is None else dtype, payload
    )


def _stream(*frames: bytes) -> bytes:
    return b"".join(wire.encode_items(frames))


def malformed_requests(model: str, rng: random.Random):
    """(method, path, kwargs) of requests that must all be refused with a 4xx."""
    hexkey = lambda: rng.randbytes(32).hex()  # noqa: E731
    key = lambda: rng.randbytes(32)  # noqa: E731
    put = lambda body, **params: ("PUT", "/v1/blocks", {"params": {"model": model, **params}, "content": body})  # noqa: E731
    good = _frame(key())
    for _ in range(150):  # random bytes, to every route that takes a body
        body = rng.randbytes(rng.randrange(0, 4096))
        yield put(body) if body else put(b"\xc1")
        yield rng.choice(
            [
                ("POST", "/v1/lookup", {"content": body}),
                ("POST", "/v1/blocks/get", {"content": body}),
                ("POST", "/v1/specs", {"content": body}),
                ("POST", "/v1/pins", {"content": body}),
                ("POST", "/v1/blocks/delete", {"content": body}),
            ]
        )
    for _ in range(150):  # truncated frames and streams
        s = _stream(good, _frame(key()))
        yield put(s[: rng.randrange(1, len(s) - 1)])
        f = bytearray(good)
        cut = rng.randrange(1, len(f) - 1)
        yield put(b"\xc6" + len(f).to_bytes(4, "big") + bytes(f[:cut]))
    for _ in range(60):  # oversized: declared lengths past the end, bodies past the limit
        yield put(b"\xc6" + rng.randrange(1 << 20, 1 << 32).to_bytes(4, "big") + good[:100])
        yield put(good + b"\xc6\xff\xff\xff\xff")
    for _ in range(3):
        yield put(_stream(*[_frame(key()) for _ in range(1)]) + rng.randbytes((1 << 20) + 1))  # > max_request_bytes
        yield put(iter([_stream(good)] + [rng.randbytes(256 << 10)] * 5))  # streamed (chunked, no Content-Length) past it
        yield (
            "POST",
            "/v1/lookup",
            {"content": iter([b'{"model": "' + model.encode() + b'", "token_ids": [' + b"1," * (200 << 10) + b"1]}"])},
        )
        yield ("POST", "/v1/lookup", {"json": {"model": model, "token_ids": [1] * 200_000}})  # > max_json_bytes
    for _ in range(100):  # wrong shapes, dtypes, specs, codecs, checksums, payload sizes
        shape = list(TINY.block_shape)
        shape[rng.randrange(5)] += rng.choice([-1, 1, 7])
        yield put(_stream(_frame(key(), shape=tuple(shape))))
        yield put(_stream(_frame(key(), dtype=rng.choice(["float32", "bfloat16", "int8", "", "float16 "]))))
        yield put(_stream(good, _frame(key(), spec=OTHER)))
        yield put(_stream(_frame(key(), codec=rng.choice(["nope", "", "identity+zzz", "kivi9"]))))
        yield put(_stream(_frame(key(), data=rng.randbytes(rng.randrange(0, 4000)))))
        bad = bytearray(_frame(key()))
        bad[-rng.randrange(1, 2048)] ^= 1 << rng.randrange(8)
        yield put(_stream(bytes(bad)))
        yield put(_stream(good, None))  # a nil in a put
        yield put(_stream(msgpack.packb({"v": 1, "key": key(), "data": b"x"})))
        yield put(_stream(good), parent=rng.choice(["xyz", "00" * 31, "g" * 64]))
    for _ in range(60):  # wrong JSON fields and types
        yield ("POST", "/v1/lookup", {"json": {"model": model, "token_ids": [rng.choice([-1, 2**32, 1.5, "a", None, [1]])]}})
        yield ("POST", "/v1/lookup", {"json": {"model": model, "hashes": [rng.choice(["", "0" * 63, "0" * 65, "zz" * 32, 5])]}})
        yield ("POST", "/v1/lookup", {"json": rng.choice([[], 1, "x", None, {"model": model, "token_ids": [], "hashes": []}])})
        yield ("POST", "/v1/blocks/get", {"json": {"model": model, "keys": [hexkey()] * rng.randrange(65, 200)}})
        yield ("POST", "/v1/blocks/get", {"json": {"model": model, "keys": rng.choice([[], "abc", [1, 2], None])}})
        yield ("POST", "/v1/pins", {"json": {"model": model, "keys": [hexkey()], "ttl_s": rng.choice([0, -1, 1e12, "x", None])}})
        yield (
            "POST",
            "/v1/specs",
            {"json": {"model_id": "x" * rng.randrange(257, 400), "num_layers": 1, "num_kv_heads": 1, "head_dim": 1}},
        )
        yield (
            "POST",
            "/v1/specs",
            {"json": {"model_id": "m", "num_layers": rng.choice([0, -3, 1.5, "a", 10**9]), "num_kv_heads": 1, "head_dim": 1}},
        )
        yield (
            "POST",
            "/v1/specs",
            {"json": {"model_id": "m", "num_layers": 4096, "num_kv_heads": 4096, "head_dim": 4096}},
        )  # > max_block_bytes
        yield ("DELETE", f"/v1/pins/{rng.choice(['x', '0', '-5', str(2**70)])}", {})
        yield ("GET", "/v1/events", {"params": {"after": rng.choice(["-1", "x", "1e99"]), "limit": rng.choice(["0", "x", "-2"])}})
    # /v1/retrieve and /v1/attention: JSON and msgpack bodies, wrong tensors, budgets, layers, chains
    q_ok = {"dtype": "float32", "shape": [TINY.num_layers, 4, TINY.head_dim], "data": bytes(4 * TINY.num_layers * 4 * TINY.head_dim)}
    mp = lambda path, obj: (
        "POST",
        path,
        {
            "content": obj if isinstance(obj, bytes) else msgpack.packb(obj, use_bin_type=True),  # noqa: E731
            "headers": {"content-type": "application/msgpack"},
        },
    )
    for _ in range(40):
        path = rng.choice(["/v1/retrieve", "/v1/attention"])
        body = rng.randbytes(rng.randrange(1, 2048))
        yield mp(path, body if body[0] != 0xC0 else b"\xc1")  # random bytes as msgpack (nil alone is no map: 422)
        yield ("POST", path, {"content": body})  # random bytes as JSON
        yield (
            "POST",
            path,
            {
                "content": b'{"model": 1}',
                "headers": {"content-type": rng.choice(["text/plain", "application/x-www-form-urlencoded", "image/png"])},
            },
        )
        full = msgpack.packb({"model": model, "hashes": [hexkey()], "q": q_ok, "budget": 64}, use_bin_type=True)
        yield mp(path, full[: rng.randrange(1, len(full) - 1)])  # truncated
        q = dict(q_ok)
        bad = rng.randrange(7)
        if bad == 0:
            q["shape"] = [rng.choice([1, 3, 0]), 4, TINY.head_dim]
        elif bad == 1:
            q["shape"] = [TINY.num_layers, rng.choice([3, 5, 0, 4096]), TINY.head_dim]
        elif bad == 2:
            q["shape"] = [TINY.num_layers, 4, rng.choice([7, 9, 1])]
        elif bad == 3:
            q["dtype"] = rng.choice(["int8", "float64", "", "float8_e4m3fn", 5])
        elif bad == 4:
            q["data"] = q["data"][: rng.randrange(0, len(q["data"]))]
        elif bad == 5:
            q["data"] = b"\x00\x00\xc0\x7f" * (len(q["data"]) // 4)  # NaN
        else:
            q = rng.choice([None, [], "x", {"dtype": "float32"}, {**q_ok, "extra": 1}, {**q_ok, "shape": [2, -4, 8]}])
        yield mp(path, {"model": model, "hashes": [hexkey()], "q": q, "budget": 64})
        yield (
            "POST",
            path,
            {
                "json": {
                    "model": model,
                    "token_ids": list(range(32)),
                    "budget": 64,
                    "q": {**q_ok, "data": rng.choice(["!!notbase64", 5, "AAAA"])},
                }
            },
        )
        yield mp(path, {"model": model, "hashes": [hexkey()], "q": q_ok, "budget": rng.choice([0, -1, 1, 35, 2**31, 10**7, "x", 1.5])})
        yield mp(
            path,
            {
                "model": model,
                "hashes": [hexkey()],
                "q": q_ok,
                "budget": 64,
                "layers": rng.choice([[0], [0, 0], [0, 2], [-1, 0], [], "x", [0.5, 1]]),
            },
        )
        yield mp(path, {"model": model, "hashes": rng.choice([[], ["zz" * 32], [hexkey()] * 70_000, None]), "q": q_ok, "budget": 64})
        yield mp(path, {"model": model, "token_ids": [1], "hashes": [hexkey()], "q": q_ok, "budget": 64})
        yield mp(path, {"model": rng.choice([hexkey(), "", "x" * 65]), "hashes": [hexkey()], "q": q_ok, "budget": 64})
        yield mp(path, {"model": model, "hashes": [hexkey()], "q": q_ok, "budget": 64, "surprise": True})
    yield mp("/v1/retrieve", {"model": model, "hashes": [hexkey()], "q": q_ok})  # budget required
    for _ in range(60):  # unknown model ids (404)
        m = rng.choice([hexkey(), "", "x" * 65, model[:-1] + "0"])
        yield ("POST", "/v1/lookup", {"json": {"model": m, "token_ids": [1, 2, 3]}})
        yield ("PUT", "/v1/blocks", {"params": {"model": m}, "content": _stream(good)})
        yield ("POST", "/v1/blocks/delete", {"json": {"model": m, "keys": [hexkey()]}})


def test_fuzz_malformed_requests(server):
    rng = random.Random(1234)
    auth = {"Authorization": f"Bearer {KEY}"}
    with KVTierClient(server.url, api_key=KEY) as c, httpx.Client(base_url=server.url, headers=auth, timeout=30) as http:
        model = c.register_spec(TINY)
        keys = chain_hashes(TINY, list(range(16 * 6)))
        blocks = torch.randn(6, *TINY.block_shape, generator=torch.Generator().manual_seed(0)).half()
        assert c.put(model, keys, blocks) == [True] * 6
        before = c.stats()
        last_event = c.events(limit=10_000)["next_after"]

        n = 0
        statuses: dict[int, int] = {}
        for method, path, kwargs in malformed_requests(model, rng):
            r = http.request(method, path, **kwargs)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert 400 <= r.status_code < 500, (
                method,
                path,
                {k: (v if k != "content" else v[:80]) for k, v in kwargs.items()},
                r.status_code,
                r.text[:300],
            )
            if r.headers.get("content-type", "").startswith("application/json"):
                assert "error" in r.json() and r.json()["error"]["message"]
            n += 1
        # bad and missing keys
        for _ in range(50):
            hdr = rng.choice(
                [
                    {},
                    {"Authorization": "Bearer " + rng.randbytes(12).hex()},
                    {"X-API-Key": rng.randbytes(8).hex()},
                    {"Authorization": rng.choice(["Bearer", "Bearer x y", "Token x", "bearer"])},
                ]
            )
            r = httpx.post(server.url + "/v1/lookup", json={"model": model, "token_ids": [1]}, headers=hdr)
            assert r.status_code == 401, r.text
            r = httpx.put(server.url + "/v1/blocks", params={"model": model}, content=_stream(_frame(rng.randbytes(32))), headers=hdr)
            assert r.status_code == 401, r.text
            n += 2
        # unknown but valid hashes: a miss, no error, no change
        for _ in range(20):
            unknown = [rng.randbytes(32) for _ in range(rng.randrange(1, 64))]
            assert c.lookup(model, hashes=unknown).num_blocks == 0
            assert c.get(model, unknown) == [None] * len(unknown)
            assert c.delete(model, unknown) == 0
            assert c.pin(model, unknown, 1.0)["num_pinned"] == 0
            q = torch.randn(TINY.num_layers, 4, TINY.head_dim)
            assert c.retrieve(model, q, 64, hashes=unknown).num_tokens == 0
            assert c.attention(model, q, hashes=unknown).num_tokens == 0
        assert n >= 1000, n
        assert server.alive() and http.get("/healthz").status_code == 200

        after = c.stats()
        assert after["bytes"] == before["bytes"]
        assert c.events(after=last_event)["events"] == []  # nothing stored, nothing removed
        assert c.lookup(model, hashes=keys).num_blocks == 6
        assert all(torch.equal(g, b) for g, b in zip(c.get(model, keys), blocks))
        assert sorted(http.get("/v1/specs").json()) == [model]
        print(f"{n} malformed requests, statuses {dict(sorted(statuses.items()))}")
