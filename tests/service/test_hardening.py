"""Regression tests of the adversarial run (issue 17), each against a real ``kvtier serve``.

Every test reproduces one attack or fault of the report and checks that it now gets a 4xx (or is
closed, or waits), that nothing changed, and that the server keeps answering everyone else.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import httpx
import pytest
import torch

from kvtier.kvstore import KVSpec, Namespace, chain_hashes
from kvtier.service.client import KVTierClient, KVTierError
from kvtier.service.grpc_client import KVTierGrpcClient, _put_msgs

from .conftest import KEYS, TINY
from .server import ServiceProcess

KEY_A, KEY_B = list(KEYS)  # tenants acme, globex


def _blocks(n: int, spec: KVSpec = TINY, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *spec.block_shape, generator=torch.Generator().manual_seed(seed)).to(spec.torch_dtype)


def _keys(n: int, salt: str) -> list[bytes]:
    return chain_hashes(TINY, list(range(16 * n)), Namespace(salt=salt))


def _h(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _client_from(address: str, **kw) -> httpx.Client:
    """An HTTP client whose connections come from another loopback address (another "client address")."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=5, **kw)


@pytest.fixture(scope="module")
def tenants_server():
    s = ServiceProcess(
        {
            "KVTIER_API_KEYS": json.dumps(KEYS),
            "KVTIER_MAX_LEASES": "20",
            "KVTIER_MAX_LEASES_PER_TENANT": "10",
            "KVTIER_MAX_SPECS_PER_TENANT": "2",
        },
        grpc=True,
    )
    yield s
    s.stop()


# -- 1, 2: bad JSON is a 4xx, before and after authentication, and logs no traceback --------
def test_deeply_nested_json_and_lone_surrogates_are_4xx(tenants_server):
    srv = tenants_server
    nested = b"[" * 5000 + b"]" * 5000
    with KVTierClient(srv.url, KEY_A) as a:
        model = a.register_spec(TINY)
        keys = _keys(2, "deep")
        assert a.put(model, keys, _blocks(2)) == [True, True]
        before = a.stats()
    for headers in ({}, _h(KEY_A)):
        for path in ("/v1/lookup", "/v1/retrieve", "/v1/attention", "/v1/pins", "/v1/blocks/get"):
            r = httpx.post(srv.url + path, content=nested, headers={"content-type": "application/json", **headers})
            assert 400 <= r.status_code < 500, (path, headers, r.status_code, r.text[:200])
    for field, value in (("salt", "\ud800"), ("extra_keys", ["\udfff"])):
        body = json.dumps({"model": model, "token_ids": list(range(32)), field: value})  # json escapes: "\ud800"
        for path in ("/v1/lookup",):
            r = httpx.post(srv.url + path, content=body, headers={"content-type": "application/json", **_h(KEY_A)})
            assert r.status_code == 422, (field, r.status_code, r.text[:200])
        q = {"dtype": "float32", "shape": [2, 2, 8], "data": "AAAA"}
        body = json.dumps({"model": model, "token_ids": list(range(32)), field: value, "q": q, "budget": 40})
        r = httpx.post(srv.url + "/v1/retrieve", content=body, headers={"content-type": "application/json", **_h(KEY_A)})
        assert r.status_code == 422
    with KVTierClient(srv.url, KEY_A) as a:
        after = a.stats()
        assert after == before and a.lookup(model, hashes=keys).num_blocks == 2
    assert "Traceback" not in srv.log_text() and "internal error" not in srv.log_text()
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'status="500"' not in metrics


# -- 5: one tenant cannot exhaust limits shared by all ----------------------------------------
def test_leases_are_per_tenant_and_empty_pins_hold_none(tenants_server):
    srv = tenants_server
    with KVTierClient(srv.url, KEY_A, retries=0) as a, KVTierClient(srv.url, KEY_B, retries=0) as b:
        model = a.register_spec(TINY)
        assert b.register_spec(TINY) == model
        a_keys, b_keys = _keys(2, "lease-a"), _keys(2, "lease-b")
        assert a.put(model, a_keys, _blocks(2)) == [True, True]
        assert b.put(model, b_keys, _blocks(2, seed=1)) == [True, True]
        # the report: B's 25 pins of keys that pin nothing, with max_leases = 20
        for _ in range(25):
            lease = b.pin(model, _keys(1, "nothing-here"), ttl_s=3600)
            assert lease["lease_id"] == 0 and lease["num_pinned"] == 0  # no lease is held
        # B's real pins stop at its own cap ...
        held = [b.pin(model, b_keys, ttl_s=3600) for _ in range(10)]
        assert all(x["num_pinned"] == 2 for x in held)
        with pytest.raises(KVTierError) as e:
            b.pin(model, b_keys, ttl_s=3600)
        assert e.value.status == 429 and "max_leases_per_tenant" in e.value.message
        # ... and A still pins its own blocks
        lease = a.pin(model, a_keys, ttl_s=3600)
        assert lease["num_pinned"] == 2 and lease["lease_id"] > 0
        assert a.unpin(lease["lease_id"])
        for x in held:
            assert b.unpin(x["lease_id"])
        assert b.pin(model, b_keys, ttl_s=1)["num_pinned"] == 2  # B's leases are free again


def test_specs_are_per_tenant_and_can_be_unregistered(tenants_server):
    srv = tenants_server
    specs = [KVSpec(f"spec-{i}", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=16) for i in range(4)]
    with KVTierClient(srv.url, KEY_A, retries=0) as a, KVTierClient(srv.url, KEY_B, retries=0) as b:
        for m in list(b._request("GET", "/v1/specs").json()):  # B's registrations of the other tests
            b.unregister_spec(m)
        m0, m1 = b.register_spec(specs[0]), b.register_spec(specs[1])
        assert b.register_spec(specs[0]) == m0  # registering again is no new spec
        with pytest.raises(KVTierError) as e:
            b.register_spec(specs[2])
        assert e.value.status == 429 and "max_specs_per_tenant" in e.value.message
        a_models = list(a._request("GET", "/v1/specs").json())
        assert a.register_spec(specs[3])  # A is not affected by B's registrations
        assert b.unregister_spec(m1) is True
        with pytest.raises(KVTierError) as e:
            b.lookup(m1, token_ids=list(range(16)))
        assert e.value.status == 404
        with pytest.raises(KVTierError) as e:
            b.unregister_spec(m1)  # not B's any more
        assert e.value.status == 404
        with pytest.raises(KVTierError) as e:
            a.unregister_spec(m0)  # B's registration is not A's to withdraw
        assert e.value.status == 404
        assert b.register_spec(specs[2])  # room again
        assert set(a._request("GET", "/v1/specs").json()) == set(a_models) | {specs[3].fingerprint.hex()}
        for m in list(b._request("GET", "/v1/specs").json()):  # leave B's room to the other tests
            b.unregister_spec(m)


# -- 6: the events cursor does not move with other tenants' activity ---------------------------
def test_events_cursor_is_private_to_the_tenant(tenants_server):
    srv = tenants_server
    with KVTierClient(srv.url, KEY_A) as a, KVTierClient(srv.url, KEY_B) as b:
        model = a.register_spec(TINY)
        b.register_spec(TINY)
        start = b.events(limit=10_000)["next_after"]
        assert a.put(model, _keys(5, "ev-a"), _blocks(5)) == [True] * 5
        seen = b.events(after=start)
        assert seen == {"events": [], "next_after": start}  # A's 5 blocks move nothing of B's
        b_keys = _keys(1, "ev-b")
        assert b.put(model, b_keys, _blocks(1)) == [True]
        mine = b.events(after=start)
        assert [e["key"] for e in mine["events"] if e["kind"] == "stored"][:1] == [b_keys[0].hex()]
        assert [e["id"] for e in mine["events"]] == list(range(start + 1, mine["next_after"] + 1))  # consecutive
        assert b.delete(model, b_keys) == 1
        removed = b.events(after=mine["next_after"])["events"]
        assert removed and all(e["kind"] == "removed" and e["key"] == b_keys[0].hex() for e in removed)


# -- 4: gRPC uploads wait for a transfer slot like REST's ------------------------------------
def test_grpc_puts_respect_max_concurrent_transfers():
    srv = ServiceProcess({"KVTIER_MAX_CONCURRENT_TRANSFERS": "1"}, grpc=True)
    try:
        with KVTierGrpcClient(srv.grpc_target, retries=0) as g:
            model = g.register_spec(TINY)
            first, second = _keys(2, "slot-a"), _keys(1, "slot-b")
            msgs = _put_msgs(TINY, model, first, _blocks(2), None)
            release = threading.Event()

            def slow_stream():
                yield msgs[0]
                release.wait(30)  # holds its slot while the stream stays open
                yield from msgs[1:]

            holder: dict = {}
            t = threading.Thread(target=lambda: holder.setdefault("reply", g._put_blocks(slow_stream(), timeout=60)))
            t.start()
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as e:  # the second upload waits for the slot
                g._put_blocks(iter(_put_msgs(TINY, model, second, _blocks(1, seed=3), None)), timeout=1.5)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            release.set()
            t.join(30)
            assert list(holder["reply"].stored) == [True, True]
            assert g.put(model, second, _blocks(1, seed=3)) == [True]  # the slot is free again
            assert g.lookup(model, hashes=second).num_blocks == 1
            assert g.lookup(model, hashes=first).num_blocks == 2
            assert g.unregister_spec(model) is True  # gRPC has the REST call's unregistration too
            with pytest.raises(KVTierError) as e:
                g.lookup(model, hashes=first)
            assert e.value.status == 404
    finally:
        srv.stop()


# -- 3, 7: idle connections, per-address cap, request cap, stalled bodies, a client gone -------
def test_idle_connections_do_not_take_rest_down():
    srv = ServiceProcess({"KVTIER_HEADER_TIMEOUT_S": "2", "KVTIER_MAX_CONNECTIONS_PER_CLIENT": "40", "KVTIER_MAX_CONNECTIONS": "60"})
    idle: list[socket.socket] = []
    try:
        host, port = "127.0.0.1", srv.port
        for _ in range(41):  # no request sent: the 41st from this address is refused at once
            s = socket.create_connection((host, port))
            idle.append(s)
        idle[-1].settimeout(2)
        assert idle[-1].recv(200).startswith(b"HTTP/1.1 503")
        # another address still gets in; at max_connections the longest-idle sockets make room
        others = [socket.create_connection((host, port), source_address=("127.0.0.3", 0)) for _ in range(25)]
        idle += others
        with _client_from("127.0.0.2") as c:
            assert c.get(srv.url + "/healthz").status_code == 200
            assert c.get(srv.url + "/v1/stats").status_code == 200
        # within header_timeout_s every socket that sent nothing is closed by the server
        deadline = time.monotonic() + 6
        for s in idle:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while s.recv(4096):  # the refused one's 503, then EOF
                    pass
            except socket.timeout:
                pytest.fail("an idle connection outlived header_timeout_s")
        metrics = httpx.get(srv.url + "/metrics").text
        for name in ("kvtier_connections_refused_total", "kvtier_header_timeouts_total", "kvtier_idle_evicted_total"):
            assert float(next(x for x in metrics.splitlines() if x.startswith(name)).split()[-1]) >= 1, name

    finally:
        for s in idle:
            s.close()
        srv.stop()


def test_stalled_body_times_out_and_a_client_gone_mid_upload_is_no_500():
    srv = ServiceProcess({"KVTIER_BODY_TIMEOUT_S": "2", "KVTIER_LIMIT_CONCURRENCY": "2"})
    try:
        with KVTierClient(srv.url) as c:
            model = c.register_spec(TINY)
        head = (
            f"PUT /v1/blocks?model={model} HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-kvtier-frames\r\n"
            "content-length: 1000000\r\n\r\n"
        ).encode()
        stalled = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
        for s in stalled:
            s.sendall(head + b"\x00" * 1000)
        time.sleep(0.3)
        assert httpx.get(srv.url + "/v1/stats").status_code == 503  # both slots of limit_concurrency held
        assert httpx.get(srv.url + "/healthz").status_code == 200  # health answers at the cap
        for s in stalled:
            s.settimeout(5)
            assert s.recv(200).startswith(b"HTTP/1.1 408")
            s.close()
        assert httpx.get(srv.url + "/v1/stats").status_code == 200
        # the report's item 7: a client that leaves mid-upload
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(head + b"\x00" * 5000)
            time.sleep(0.1)
            s.close()
        time.sleep(0.5)
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'status="500"' not in metrics and 'status="499"' in metrics
        for name in ("kvtier_overloaded_total", "kvtier_body_timeouts_total"):
            assert float(next(x for x in metrics.splitlines() if x.startswith(name)).split()[-1]) >= 1, name
        assert "internal error" not in srv.log_text() and "Traceback" not in srv.log_text()
        with KVTierClient(srv.url) as c:
            assert c.stats()["blocks"] == 0
    finally:
        srv.stop()


# -- 5 (rate): one tenant's request rate does not limit another's -----------------------------
def test_tenant_request_rate_limit():
    srv = ServiceProcess({"KVTIER_API_KEYS": json.dumps(KEYS), "KVTIER_TENANT_REQUESTS_PER_S": "1", "KVTIER_TENANT_BURST": "5"})
    try:
        codes = [httpx.get(srv.url + "/v1/stats", headers=_h(KEY_B)).status_code for _ in range(8)]
        assert codes[:5] == [200] * 5 and 429 in codes[5:]
        r = httpx.get(srv.url + "/v1/stats", headers=_h(KEY_B))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        r = httpx.post(srv.url + "/v1/lookup", headers=_h(KEY_B), json={"model": "0" * 64, "token_ids": [1]})
        assert r.status_code == 429  # the fast lookup path too
        assert httpx.get(srv.url + "/v1/stats", headers=_h(KEY_A)).status_code == 200  # A is not B
        assert httpx.get(srv.url + "/healthz").status_code == 200
    finally:
        srv.stop()


# -- 8: acknowledged blocks survive a graceful stop; a full disk is refused, counted, reported --
def test_graceful_stop_keeps_every_acknowledged_block():
    srv = ServiceProcess({"KVTIER_LOG_LEVEL": "info"})  # no Redis; device + host + disk (the report: 50 misses after a restart)
    try:
        with KVTierClient(srv.url) as c:
            model = c.register_spec(TINY)
            chains = [_keys(1, f"stop-{i}") for i in range(50)]
            for i, keys in enumerate(chains):
                assert c.put(model, keys, _blocks(1, seed=i)) == [True]
        srv.stop()  # SIGTERM (uvicorn re-raises it after its graceful shutdown: the exit status is -15)
        assert "flushed 50 block(s)" in srv.log_text()
        srv.start()
        with KVTierClient(srv.url) as c:
            assert c.register_spec(TINY) == model
            for i, keys in enumerate(chains):
                assert c.lookup(model, hashes=keys).num_blocks == 1
                assert torch.equal(c.get(model, keys)[0], _blocks(1, seed=i)[0])
    finally:
        srv.stop()


def test_full_disk_refuses_puts_instead_of_dropping_them():
    srv = ServiceProcess(
        {
            "KVTIER_DEVICE_CAPACITY_BYTES": "0",
            "KVTIER_HOST_CAPACITY_BYTES": "128KiB",
            "KVTIER_DISK_MIN_FREE_BYTES": "1000TB",
            "KVTIER_FLUSH_ON_CLOSE": "false",
        }
    )
    try:
        with KVTierClient(srv.url, retries=0) as c:
            model = c.register_spec(TINY)
            acked = []
            for i in range(150):
                keys = _keys(1, f"full-{i}")
                if c.put(model, keys, _blocks(1, seed=i)) == [True]:
                    acked.append((i, keys))
            assert 0 < len(acked) < 150
            for i, keys in acked:  # every acknowledged block is there
                assert torch.equal(c.get(model, keys)[0], _blocks(1, seed=i)[0])
            host = next(t for t in c.stats()["tiers"] if t["name"] == "host")
            assert host["demotion_failures"] > 0 and host["evictions"] == 0
        r = httpx.get(srv.url + "/readyz")
        assert r.status_code == 503 and r.json()["status"] == "degraded" and r.json()["tiers"]["disk"].startswith("full")
        assert srv.data_dir not in r.text  # /readyz is public: no paths
    finally:
        srv.stop()


# -- 9, 10: two instances over one Redis stay coherent; a Redis restarted empty is seen as empty -
def _until(pred, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.mark.redis
def test_two_instances_drop_copies_another_deleted_or_rewrote(fresh_redis_server):
    env = {"KVTIER_REDIS_URL": fresh_redis_server.url}
    a_srv, b_srv = ServiceProcess(env), ServiceProcess(env)
    try:
        with KVTierClient(a_srv.url) as a, KVTierClient(b_srv.url) as b:
            model = a.register_spec(TINY)
            assert b.register_spec(TINY) == model
            keys = _keys(3, "coherent")
            old, new = _blocks(3, seed=1), _blocks(3, seed=2)
            assert a.put(model, keys, old) == [True] * 3
            assert all(torch.equal(g, x) for g, x in zip(b.get(model, keys), old))  # B now holds copies of its own
            assert b.stats()["tiers"][0]["blocks"] == 3  # in B's device tier

            # the report: delete through A, B kept serving its copies
            assert a.delete(model, keys) == 3
            assert _until(lambda: b.get(model, keys) == [None] * 3)
            assert b.lookup(model, hashes=keys).num_blocks == 0
            # ... and after A put other bytes under the same keys, B served the old ones
            assert a.put(model, keys, new) == [True] * 3
            assert _until(lambda: all(g is not None and torch.equal(g, x) for g, x in zip(b.get(model, keys), new)))

            # an overwrite through B reaches A's copies too
            assert all(torch.equal(g, x) for g, x in zip(a.get(model, keys), new))
            assert b.delete(model, keys) == 3
            assert b.put(model, keys, old) == [True] * 3
            assert _until(lambda: all(g is not None and torch.equal(g, x) for g, x in zip(a.get(model, keys), old)))
    finally:
        a_srv.stop()
        b_srv.stop()


@pytest.mark.redis
def test_redis_restarted_empty_is_not_counted_as_full(fresh_redis_server):
    redis = fresh_redis_server
    srv = ServiceProcess(
        {
            "KVTIER_REDIS_URL": redis.url,
            "KVTIER_REDIS_RETRY_INTERVAL_S": "0.2",
            "KVTIER_REDIS_SOCKET_TIMEOUT_S": "0.5",
            "KVTIER_API_KEYS": json.dumps(KEYS),
            "KVTIER_ADMIN_KEY": "admin-key-0123456789",
        }
    )
    admin = _h("admin-key-0123456789")

    def redis_blocks() -> int:
        return next(t for t in httpx.get(srv.url + "/v1/stats", headers=admin).json()["tiers"] if t["name"] == "redis")["blocks"]

    try:
        with KVTierClient(srv.url, KEY_A) as a:
            model = a.register_spec(TINY)
            for i in range(10):
                assert a.put(model, _keys(1, f"restart-{i}"), _blocks(1, seed=i)) == [True]
        assert redis_blocks() == 10
        redis.stop()
        r = httpx.get(srv.url + "/readyz")  # public: no address of the Redis in the answer
        assert r.status_code == 503 and r.json()["status"] == "degraded"
        assert r.json()["tiers"]["redis"].startswith("unreachable") and "127.0.0.1" not in r.text and str(redis.port) not in r.text
        redis.start()  # empty: no persistence
        with KVTierClient(srv.url, KEY_A) as a:  # any call notices Redis is back; the accounting is checked
            assert _until(lambda: a.lookup(model, hashes=_keys(1, "restart-0")) is not None and redis_blocks() == 0)
        assert httpx.get(srv.url + "/readyz").status_code == 200
    finally:
        srv.stop()


# -- TLS for REST and gRPC; encryption at rest through the service ------------------------------
def _self_signed(directory) -> tuple[str, str]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvtier-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = f"{directory}/cert.pem", f"{directory}/key.pem"
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_for_rest_and_grpc_and_encryption_at_rest(tmp_path):
    cert, key = _self_signed(tmp_path)
    secret = "11" * 32
    srv = ServiceProcess(
        {
            "KVTIER_TLS_CERT": cert,
            "KVTIER_TLS_KEY": key,
            "KVTIER_ENCRYPTION_KEY": secret,
            "KVTIER_DEVICE_CAPACITY_BYTES": "0",
            "KVTIER_HOST_CAPACITY_BYTES": "0",
        },
        grpc=True,
    )
    try:
        assert srv.url.startswith("https://")
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.url.replace("https://", "http://") + "/healthz", timeout=3)  # no plaintext HTTP
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.url + "/healthz", timeout=3)  # a client that does not trust the certificate
        keys, data = _keys(2, "tls"), _blocks(2, seed=9)
        with KVTierClient(srv.url, verify=cert) as c:
            model = c.register_spec(TINY)
            assert c.put(model, keys, data) == [True, True]  # disk is the only tier: encrypted files
        with KVTierGrpcClient(srv.grpc_target, root_certificates=open(cert, "rb").read(), retries=0) as g:
            assert g.register_spec(TINY) == model
            assert all(torch.equal(x, y) for x, y in zip(g.get(model, keys), data))
        with KVTierGrpcClient(srv.grpc_target, retries=0, timeout=3) as plain:
            with pytest.raises(KVTierError) as e:  # a plaintext channel gets nowhere
                plain.register_spec(TINY)
            assert e.value.status == 503
        from pathlib import Path

        files = list((Path(srv.data_dir) / "blocks").rglob("*.kvf"))
        assert len(files) == 2
        assert all(f.read_bytes().startswith(b"KVTE1") and data[0].numpy().tobytes()[:64] not in f.read_bytes() for f in files)
    finally:
        srv.stop()


@pytest.mark.redis
def test_delete_after_a_restart_reaches_redis(fresh_redis_server):
    srv = ServiceProcess({"KVTIER_REDIS_URL": fresh_redis_server.url})
    try:
        with KVTierClient(srv.url) as c:
            model = c.register_spec(TINY)
            keys = _keys(2, "restart-delete")
            assert c.put(model, keys, _blocks(2)) == [True, True]
        srv.stop()
        srv.start()  # the new process knows these blocks from its disk tier only
        with KVTierClient(srv.url) as c:
            assert c.register_spec(TINY) == model
            assert c.delete(model, keys) == 2
            with fresh_redis_server.client() as r:
                assert sum(1 for _ in r.scan_iter(match=b"kvtier:*:*")) == 0  # the Redis copies went too
            assert c.get(model, keys) == [None, None]
    finally:
        srv.stop()


def test_default_quota_bounds_every_tenant_without_its_own(tmp_path):
    from kvtier.service.settings import Settings
    from kvtier.service.storebuild import build_store

    s = Settings(data_dir=tmp_path, api_keys=KEYS, quotas={"acme": 1 << 20}, default_quota_bytes="64KiB", grpc_port="", redis_url=None)
    store = build_store(s)
    try:
        assert store._ledger.quotas == {"acme": 1 << 20, "globex": 64 << 10, "": 64 << 10}
        for i in range(40):  # 40 blocks of 2 KiB = 80 KiB > globex's 64 KiB
            assert store.put(TINY, _keys(1, f"quota-{i}"), list(_blocks(1, seed=i)), tenant="globex") == [True]
        assert store.tenant_bytes("globex") <= 64 << 10 and store.stats()["quota_evictions"] > 0  # its own oldest went
        assert store.put(TINY, _keys(40, "acme"), list(_blocks(40)), tenant="acme") == [True] * 40
        assert store.tenant_bytes("acme") == 40 * TINY.block_nbytes
    finally:
        store.close()
