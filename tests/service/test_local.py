"""The same-host transport against a real ``kvtier serve``: the same answers, auth, tenancy, quotas,
limits and checksums as REST; requests larger than the segment; no segment left by a killed client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from kvtier.kvstore import KVSpec
from kvtier.kvstore.frames import encode_frame_parts
from kvtier.service import wire
from kvtier.service.client import KVTierClient, KVTierError
from kvtier.service.local import recv_msg, send_msg
from kvtier.service.local_client import LocalKVTierClient

from .conftest import ADMIN_KEY, KEYS, TINY
from .server import ROOT, ServiceProcess

KEY_A, KEY_B = list(KEYS)  # acme, globex (globex has a 64 KiB quota)


@pytest.fixture(scope="module")
def server():
    d = tempfile.mkdtemp(prefix="kvtier-local-")
    s = ServiceProcess(
        {
            "KVTIER_API_KEYS": json.dumps(KEYS),
            "KVTIER_ADMIN_KEY": ADMIN_KEY,
            "KVTIER_QUOTAS": json.dumps({"globex": 64 << 10}),
            "KVTIER_LOCAL_SOCKET": f"{d}/kv.sock",
            "KVTIER_MAX_BLOCKS_PER_REQUEST": "16",
        },
        data_dir=d,
    )
    s.socket = f"unix://{d}/kv.sock"
    yield s
    s.stop()


def blocks(n, seed=0, spec=TINY):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *spec.block_shape), generator=g).to(spec.torch_dtype)


def tokens(n_blocks, seed=0):
    return [(seed * 7919 + i) % 32000 for i in range(n_blocks * TINY.block_tokens)]


def segment_maps(pid: int) -> int:
    """Mappings of local-transport segments in process ``pid``."""
    return sum("memfd:kvtier-local" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def wait_for_maps(pid: int, n: int, timeout_s: float = 30.0) -> int:
    """The number of segment mappings of ``pid`` once it is ``n`` (or whatever it is after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while segment_maps(pid) != n and time.monotonic() < deadline:
        time.sleep(0.05)
    return segment_maps(pid)


def test_a_unix_url_gives_the_local_client_with_the_same_answers_as_rest(server):
    local = KVTierClient(server.socket, api_key=KEY_A)
    rest = KVTierClient(server.url, api_key=KEY_A)
    assert isinstance(local, LocalKVTierClient) and type(rest) is KVTierClient
    model = local.register_spec(TINY)
    assert rest.register_spec(TINY) == model
    toks = tokens(5, seed=1)
    keys = local.hashes(model, toks)
    assert keys == rest.hashes(model, toks)
    bs = blocks(5, seed=1)
    assert local.put(model, keys, bs) == [True] * 5
    assert local.lookup(model, token_ids=toks).num_blocks == 5 == rest.lookup(model, token_ids=toks).num_blocks
    got = local.get(model, keys + [b"\x01" * 32])
    assert got[-1] is None and all(torch.equal(g, b) for g, b in zip(got, bs))
    assert all(torch.equal(g, b) for g, b in zip(rest.get(model, keys), bs))  # what went in locally is what REST reads
    out = [torch.empty(TINY.block_shape, dtype=TINY.torch_dtype) for _ in keys]
    assert local.get(model, keys, out=out)[0] is out[0] and torch.equal(out[4], bs[4])
    lease = local.pin(model, keys[:2], ttl_s=5)
    assert lease["num_pinned"] == 2 and local.unpin(lease["lease_id"])
    assert local.stats()["tenant"] == "acme"
    assert local.delete(model, keys[3:]) == 2 and rest.lookup(model, hashes=keys).num_blocks == 3
    local.close()
    rest.close()


def test_auth_tenancy_and_quotas_are_the_same_as_rest(server):
    with pytest.raises(KVTierError) as e:
        KVTierClient(server.socket, api_key="not-a-key").stats()
    assert e.value.status == 401
    with pytest.raises(KVTierError) as e:
        KVTierClient(server.socket).stats()
    assert e.value.status == 401
    a, b = KVTierClient(server.socket, api_key=KEY_A), KVTierClient(server.socket, api_key=KEY_B)
    ma, mb = a.register_spec(TINY), b.register_spec(TINY)
    keys = [bytes([7]) * 32, bytes([8]) * 32]
    assert a.put(ma, keys, blocks(2, seed=2)) == [True, True]
    assert b.get(mb, keys) == [None, None]  # the same client keys are another tenant's blocks
    assert b.lookup(mb, hashes=keys).num_blocks == 0
    # globex's quota is 64 KiB (32 tiny blocks): the oldest of its own blocks make room, as over REST
    for i in range(3):
        b.put(mb, [bytes([100 + i, j]) + bytes(30) for j in range(16)], blocks(16, seed=10 + i))
    assert b.stats()["bytes"] <= 64 << 10
    assert a.get(ma, keys)[0] is not None  # acme's blocks untouched
    a.close()
    b.close()


def test_limits_and_checksums_are_enforced(server):
    c = KVTierClient(server.socket, api_key=KEY_A)
    model = c.register_spec(TINY)
    with pytest.raises(KVTierError) as e:  # max_blocks_per_request is 16 on this server (REST answers the same)
        c.put(model, [bytes([1, i]) + bytes(30) for i in range(17)], blocks(17))
    assert e.value.status == 400 and "max_blocks_per_request" in e.value.message
    key = bytes([9]) * 32
    head, payload = encode_frame_parts(
        key, TINY, "identity", {}, TINY.block_shape, TINY.dtype, blocks(1, seed=3)[0].contiguous().view(torch.uint8).numpy()
    )
    spoiled = bytearray(payload.tobytes())
    spoiled[100] ^= 0xFF  # the checksum no longer matches

    def fill(seg):
        pieces = b"".join(bytes(p) for p in wire.encode_parts([(head, memoryview(spoiled))]))
        seg[: len(pieces)] = pieces
        return len(pieces)

    with pytest.raises(KVTierError) as e:
        c._call("put", {"model": model, "parent": None}, fill=fill)
    assert e.value.status == 400 and "checksum" in e.value.message
    assert c.get(model, [key]) == [None]  # nothing stored
    with pytest.raises(KVTierError) as e:
        c._call("put", {"model": model}, fill=lambda seg: 10**12)
    assert e.value.status == 400 and e.value.field == "len"
    with pytest.raises(KVTierError) as e:
        c._call("nope", {})
    assert e.value.status == 400
    with pytest.raises(KVTierError) as e:
        LocalKVTierClient(server.socket, api_key=KEY_A, segment_bytes=1 << 40).stats()
    assert e.value.field == "segment_bytes"
    c.close()


def test_a_put_over_both_halves_drops_the_summaries_it_may_have_spoiled(server):
    # 2 KiB blocks in an 8 KiB segment: one block fits a half ("alt"), three do not (written from offset 0,
    # over the half the previous put's summaries read): those summaries are dropped, and made again when needed
    c = LocalKVTierClient(server.socket, api_key=KEY_A, segment_bytes=8 << 10, stream_puts=False)  # the one-shot put
    model = c.register_spec(TINY)
    keys = c.hashes(model, tokens(4, seed=13))
    bs = blocks(4, seed=13)
    assert c.put(model, keys[:1], bs[:1]) == [True]
    assert c.put(model, keys[1:], bs[1:], parent=keys[0]) == [True] * 3
    assert all(torch.equal(g, b) for g, b in zip(c.get(model, keys), bs))
    q = torch.randn(TINY.num_layers, 2 * TINY.num_kv_heads, TINY.head_dim).to(TINY.torch_dtype)
    r = c.retrieve(model, q, budget=40, hashes=keys)
    assert r.num_blocks == 4 and r.summarized == 1  # the first block's summaries were made again, from the stored block
    c.close()


@pytest.mark.parametrize("stream_puts", [False, True])
def test_puts_alternate_halves_and_are_summarized_after_the_answer(server, stream_puts):
    c = LocalKVTierClient(server.socket, api_key=KEY_A, segment_bytes=1 << 20, stream_puts=stream_puts)
    model = c.register_spec(TINY)
    toks = tokens(4, seed=11)
    keys = c.hashes(model, toks)
    bs = blocks(4, seed=11)
    for i in range(4):  # one block per put: the halves alternate, each put's summaries follow its answer
        assert c.put(model, keys[i : i + 1], bs[i : i + 1], parent=keys[i - 1] if i else None) == [True]
    assert all(torch.equal(g, b) for g, b in zip(c.get(model, keys), bs))  # the other half never spoiled a block
    q = torch.randn(TINY.num_layers, 2 * TINY.num_kv_heads, TINY.head_dim).to(TINY.torch_dtype)
    r = c.retrieve(model, q, budget=40, hashes=keys)
    assert r.num_blocks == 4 and r.summarized == 0  # every summary was there: none read again to be made
    with pytest.raises(KVTierError) as e:  # the offset is checked like the length
        c._call("put", {"model": model, "off": 1 << 20}, fill=lambda seg: 16)
    assert e.value.status == 400 and e.value.field == "off"
    conn = c._take()  # a request that is not a map: a 400, and the connection goes on
    send_msg(conn.sock, [1, 2])
    assert recv_msg(conn.sock)["error"]["status"] == 400
    c._release(conn)
    assert c.lookup(model, hashes=keys).num_blocks == 4
    c.close()


def test_puts_go_one_after_another_in_the_segment_and_wrap_around(server):
    # 2 KiB blocks in an 8 KiB segment: each single-block put fits half the segment ("alt") and goes after the
    # previous one, wrapping to the start when it does not fit before the end; every block reads back exact,
    # and retrieval finds a summary for each (made after the answer, or made again if it was written over)
    c = LocalKVTierClient(server.socket, api_key=KEY_A, segment_bytes=8 << 10, stream_puts=False)  # the one-shot put
    model = c.register_spec(TINY)
    keys = c.hashes(model, tokens(6, seed=14))
    bs = blocks(6, seed=14)
    offsets = []
    for i in range(6):
        assert c.put(model, keys[i : i + 1], bs[i : i + 1], parent=keys[i - 1] if i else None) == [True]
        conn = c._take()
        offsets.append(conn.cursor)
        c._release(conn)
    step = offsets[0]
    assert 2048 < step <= 4096 and offsets == [step, 2 * step, 3 * step, step, 2 * step, 3 * step]
    assert all(torch.equal(g, b) for g, b in zip(c.get(model, keys), bs))
    # in a large segment the ring spans room for six puts, not the whole segment (less memory touched)
    big = LocalKVTierClient(server.socket, api_key=KEY_A, segment_bytes=1 << 20, stream_puts=False)
    ends = []
    for i in range(8):
        assert big.put(model, keys[i % 6 : i % 6 + 1], bs[i % 6 : i % 6 + 1]) == [True]
        conn = big._take()
        ends.append(conn.cursor)
        big._release(conn)
    assert ends == [step * (i + 1) for i in range(6)] + [step, 2 * step]
    big.close()
    q = torch.randn(TINY.num_layers, 2 * TINY.num_kv_heads, TINY.head_dim).to(TINY.torch_dtype)
    r = c.retrieve(model, q, budget=40, hashes=keys)
    assert r.num_blocks == 6
    c.close()


def test_summaries_read_after_the_answer_are_dropped_only_where_a_put_was_written_over_them():
    """The server's bookkeeping of the work that reads the segment after a put's answer (in process: the
    futures are real, the work is what ``LocalServer`` queues)."""
    import socket as socket_mod
    from concurrent.futures import Future

    from kvtier.service.local import _MAX_AFTER, _make_room_after, _Peer, _settle, _settle_overlapping

    a, b = socket_mod.socketpair()
    peer = _Peer(1, a)
    undone: list[str] = []

    def pending(name: str, lo: int, hi: int) -> None:
        f: Future = Future()
        f.set_result(None)
        peer.after.append((f, [lambda: undone.append(name)], lo, hi))

    pending("p0", 0, 100)
    pending("p1", 128, 228)
    pending("p2", 256, 356)
    _settle_overlapping(peer, 150, 120)  # written over p1 and p2's bytes: theirs dropped, p0's kept
    assert undone == ["p1", "p2"] and [w[2] for w in peer.after] == [0]
    _settle_overlapping(peer, 100, 28)  # between p0 and where p1 was: nothing dropped
    assert undone == ["p1", "p2"] and len(peer.after) == 1
    _settle_overlapping(peer, "x", 10)  # a request the dispatch refuses: everything pending is dropped
    assert undone == ["p1", "p2", "p0"] and not peer.after
    pending("p3", 0, 10)
    _settle(peer)  # another request: waited for, kept
    assert undone == ["p1", "p2", "p0"] and not peer.after
    pending("p4", 0, 10)
    _settle(peer, spoiled=True)  # a put that is not "alt": dropped
    assert undone[-1] == "p4"
    # bounded: with _MAX_AFTER pending, the oldest is dropped if it has not started, else waited for
    waiting: list[Future] = []
    for i in range(_MAX_AFTER):
        f = Future()
        waiting.append(f)
        peer.after.append((f, [], 100 * i, 100 * i + 10))
    _make_room_after(peer)
    assert waiting[0].cancelled() and len(peer.after) == _MAX_AFTER - 1
    assert waiting[1].set_running_or_notify_cancel()  # started: it is waited for, not dropped
    threading.Timer(0.05, waiting[1].set_result, (None,)).start()
    peer.after.append((Future(), [], 900, 910))
    _make_room_after(peer)
    assert waiting[1].done() and not waiting[1].cancelled() and len(peer.after) == _MAX_AFTER - 1
    a.close()
    b.close()


def test_a_client_that_does_not_read_its_answers_stalls_no_one_else(server):
    import msgpack

    from kvtier.service.local import _LEN

    c = LocalKVTierClient(server.socket, api_key=KEY_A)
    model = c.register_spec(TINY)
    keys = c.hashes(model, tokens(2, seed=12))
    greedy = c._take()  # its own connection, used raw below
    one = msgpack.packb({"op": "lookup", "args": {"model": model, "hashes": keys}, "len": 0}, use_bin_type=True)
    n = 4000  # about 1 MB of answers: more than a Unix socket buffers, so the server cannot send them all at once
    sender = threading.Thread(target=greedy.sock.sendall, args=((_LEN.pack(len(one)) + one) * n,))
    sender.start()  # it blocks once the server, which cannot send its answers, stops reading
    time.sleep(1.0)
    other = LocalKVTierClient(server.socket, api_key=KEY_A)
    assert other.lookup(model, hashes=keys).num_requested_blocks == 2  # others are answered meanwhile
    answers = [recv_msg(greedy.sock) for _ in range(n)]  # then every answer arrives, in order
    sender.join()
    assert all(a is not None and a["ok"]["num_requested_blocks"] == 2 for a in answers)
    c._release(greedy)
    assert c.lookup(model, hashes=keys).num_requested_blocks == 2  # and the connection still serves
    other.close()
    c.close()


def test_requests_larger_than_the_segment_are_split(server):
    spec = KVSpec("wide", num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=64)  # 32 KiB blocks
    c = LocalKVTierClient(server.socket, api_key=KEY_A, segment_bytes=100 << 10)  # 2-3 blocks per request
    model = c.register_spec(spec)
    toks = [(i * 31) % 30000 for i in range(9 * spec.block_tokens)]
    keys = c.hashes(model, toks)
    bs = blocks(9, seed=4, spec=spec)
    assert c.put(model, keys, bs) == [True] * 9
    assert c.lookup(model, token_ids=toks).num_blocks == 9  # one chain, whatever the split
    assert all(torch.equal(g, b) for g, b in zip(c.get(model, keys), bs))
    c.close()


def test_a_killed_client_leaves_no_segment(server):
    pid = server.proc.pid
    before = wait_for_maps(pid, 0)  # earlier tests' clients are closed; the server lets go asynchronously
    shm_before = set(os.listdir("/dev/shm"))
    script = textwrap.dedent(f"""
        import sys, time, torch
        from kvtier.service.client import KVTierClient
        from tests.service.conftest import TINY
        clients = [KVTierClient({server.socket!r}, api_key={KEY_A!r}) for _ in range(3)]
        for c in clients:
            c.stats()  # each opens its connection and maps its segment
        m = clients[0].register_spec(TINY)
        clients[0].put(m, [bytes([42]) * 32], torch.zeros((1, *TINY.block_shape), dtype=torch.float16))
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert wait_for_maps(pid, before + 3) == before + 3
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_for_maps(pid, before) == before  # the server let go of every segment of the dead client
        # and nothing was ever named (a memfd has no name; other processes on the machine may add their own here)
        assert not [n for n in set(os.listdir("/dev/shm")) - shm_before if "kvtier" in n]
    finally:
        proc.kill()


def test_service_backend_uses_the_local_transport(server):
    from kvtier.connectors.backends import ServiceBackend

    backend = ServiceBackend.connect(server.socket, TINY, api_key=KEY_A)
    try:
        assert isinstance(backend.client, LocalKVTierClient)
        toks = tokens(3, seed=6)
        keys = backend.keys(toks)
        assert backend.put(keys, blocks(3, seed=6), parent=None) == [True] * 3
        assert backend.match(toks).num_blocks == 3
        assert all(torch.equal(g, b) for g, b in zip(backend.get(keys), blocks(3, seed=6)))
    finally:
        backend.close()


def test_rest_lookups_never_block_the_event_loop(tmp_path):
    """While the store's lock is held (bookkeeping of another call), a REST lookup waits on a worker
    thread, not on the event loop: the server keeps answering other requests meanwhile."""
    import threading

    import httpx
    import uvicorn

    from kvtier.service.rest import create_app
    from kvtier.service.settings import Settings
    from tests.redis_servers import free_port

    port = free_port()
    settings = Settings(port=port, grpc_port=None, data_dir=tmp_path, device_capacity_bytes=0, write_through_retry_interval_s=0)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        c = KVTierClient(url)
        model = c.register_spec(TINY)
        toks = tokens(2, seed=9)
        c.put(model, c.hashes(model, toks), blocks(2, seed=9))
        store = app.state.svc.store
        answers = []
        with store._lock:  # as if another call were in its bookkeeping for a long time
            body = json.dumps({"model": model, "token_ids": toks}).encode()
            # with a Content-Length: the FastLookup middleware; chunked (no length): the FastAPI route
            for content in (body, iter([body])):
                th2 = threading.Thread(
                    target=lambda c=content: answers.append(
                        httpx.post(url + "/v1/lookup", content=c, headers={"content-type": "application/json"}, timeout=30)
                    )
                )
                th2.start()
            time.sleep(0.3)
            t0 = time.monotonic()
            assert httpx.get(url + "/healthz", timeout=5).status_code == 200  # the event loop is free
            assert time.monotonic() - t0 < 2.0
            assert not answers  # the lookup is still waiting for the lock, on a thread
        deadline = time.monotonic() + 30
        while len(answers) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [a.status_code for a in answers] == [200, 200] and all(a.json()["num_blocks"] == 2 for a in answers)
        c.close()
    finally:
        server.should_exit = True
        th.join(30)


def _child_lookup(client, model, keys, q):
    q.put(client.lookup(model, hashes=keys).num_blocks)


def test_a_forked_child_opens_its_own_connections(server):
    import multiprocessing as mp

    c = KVTierClient(server.socket, api_key=KEY_A)
    model = c.register_spec(TINY)
    keys = [bytes([77]) * 32]
    c.put(model, keys, blocks(1, seed=5))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_child_lookup, args=(c, model, keys, q))
    child.start()
    assert q.get(timeout=30) == 1
    child.join(30)
    assert c.lookup(model, hashes=keys).num_blocks == 1  # the parent's connection was not disturbed
    assert torch.equal(c.get(model, keys)[0], blocks(1, seed=5)[0])
    c.close()


def test_the_client_side_imports_no_server_code():
    """A vLLM engine reaches kvtier through local_client in an environment without the server's extras
    (no faiss there): the client side must not import the service core, retrieval or FastAPI."""
    code = (
        "import sys, kvtier.service.local_client, kvtier.service.client, kvtier.connectors.backends\n"
        "bad = [m for m in ('kvtier.service.core', 'kvtier.retrieval', 'faiss', 'fastapi') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- streamed puts (LocalServer._put_stream) -----------------------------------------------------
@pytest.fixture(scope="module", params=["device tier first", "host tier first"])
def stream_server(request, server):
    """The module's server (a device tier first: the parts are hashed in the segment and stored from it), and
    one with the host tier first (the parts are copied into buffers the host tier lends, and it keeps them)."""
    if request.param == "device tier first":
        server.lends = False
        yield server
        return
    d = tempfile.mkdtemp(prefix="kvtier-local-")
    s = ServiceProcess(
        {
            "KVTIER_API_KEYS": json.dumps(KEYS),
            "KVTIER_LOCAL_SOCKET": f"{d}/kv.sock",
            "KVTIER_ADMIN_KEY": ADMIN_KEY,
            "KVTIER_MAX_BLOCKS_PER_REQUEST": "16",
            "KVTIER_DEVICE_CAPACITY_BYTES": "0",
        },
        data_dir=d,
    )
    s.socket, s.lends = f"unix://{d}/kv.sock", True
    yield s
    s.stop()


def _adopted(server) -> int:
    """Blocks the server's tiers kept as written into buffers they lent (the store's stats: the admin's)."""
    admin = LocalKVTierClient(server.socket, api_key=ADMIN_KEY)
    try:
        return sum(t["adopted"] for t in admin.stats()["tiers"])
    finally:
        admin.close()


def _stream_request(conn, model, keys, n_bytes, *, off=0, parent=None):
    send_msg(
        conn.sock,
        {"op": "put_stream", "args": {"model": model, "keys": [k.hex() for k in keys], "parent": parent}, "len": n_bytes, "off": off},
    )


def _checksums(bs):
    import xxhash

    return [xxhash.xxh3_64_intdigest(b.contiguous().view(torch.uint8).numpy()) for b in bs]


def test_a_streamed_put_in_parts_stores_exact_blocks_and_summarizes_them(stream_server):
    # parts smaller than a block (and not dividing it): the server copies and hashes each as it is told
    server = stream_server
    c = LocalKVTierClient(server.socket, api_key=KEY_A, stream_part_bytes=700)
    assert c.stream_puts
    model = c.register_spec(TINY)
    keys = c.hashes(model, tokens(5, seed=21))
    bs = blocks(5, seed=21)
    adopted = _adopted(server)
    assert c.put(model, keys, bs) == [True] * 5
    assert c._server_put_stream
    assert _adopted(server) - adopted == (5 if server.lends else 0)  # the host tier kept the buffers the parts went into
    assert all(torch.equal(g, b) for g, b in zip(c.get(model, keys), bs))
    assert c.lookup(model, hashes=keys).num_blocks == 5  # one chain, as a one-shot put makes
    q = torch.randn(TINY.num_layers, 2 * TINY.num_kv_heads, TINY.head_dim).to(TINY.torch_dtype)
    r = c.retrieve(model, q, budget=40, hashes=keys)
    assert r.num_blocks == 5 and r.summarized == 0  # the summaries were made after the answer, from the stored blocks
    # a put larger than the segment goes as several streamed requests, the chain kept across them
    small = LocalKVTierClient(server.socket, api_key=KEY_A, segment_bytes=5 << 10)
    keys2 = small.hashes(model, tokens(5, seed=22))
    bs2 = blocks(5, seed=22)
    assert small.put(model, keys2, bs2) == [True] * 5
    assert small.lookup(model, hashes=keys2).num_blocks == 5
    assert all(torch.equal(g, b) for g, b in zip(small.get(model, keys2), bs2))
    small.close()
    c.close()


def test_a_streamed_put_with_progress_across_blocks_and_a_bad_checksum_changes_nothing(stream_server):
    server = stream_server
    c = LocalKVTierClient(server.socket, api_key=KEY_A)
    model = c.register_spec(TINY)
    keys = [bytes([31, i]) + bytes(30) for i in range(3)]
    bs = blocks(3, seed=23)
    nb = TINY.block_nbytes
    conn = c._take()
    data = b"".join(b.contiguous().view(torch.uint8).numpy().tobytes() for b in bs)
    conn.seg[: 3 * nb] = data
    _stream_request(conn, model, keys, 3 * nb)
    for ready in (1000, nb + 5, 2 * nb + 900):  # parts that span block boundaries
        send_msg(conn.sock, {"ready": ready})
    sums = _checksums(bs)
    send_msg(conn.sock, {"ready": 3 * nb, "checksums": sums})
    assert recv_msg(conn.sock) == {"ok": {"stored": [True] * 3, "num_stored": 3}}
    # the same again with one byte of the last block changed in the segment: 400, nothing stored
    keys_bad = [bytes([32, i]) + bytes(30) for i in range(3)]
    spoiled = bytearray(data)
    spoiled[2 * nb + 7] ^= 0xFF
    conn.seg[: 3 * nb] = bytes(spoiled)
    _stream_request(conn, model, keys_bad, 3 * nb)
    send_msg(conn.sock, {"ready": 3 * nb, "checksums": sums})
    err = recv_msg(conn.sock)["error"]
    assert err["status"] == 400 and "checksum" in err["message"] and err["field"] == "checksums[2]"
    c._release(conn)  # the connection goes on
    assert c.get(model, keys_bad) == [None] * 3 and c.lookup(model, hashes=keys_bad).num_blocks == 0
    assert all(torch.equal(g, b) for g, b in zip(c.get(model, keys), bs))
    c.close()


def test_a_refused_streamed_put_reads_the_clients_parts_then_answers(stream_server):
    server = stream_server
    c = LocalKVTierClient(server.socket, api_key=KEY_A)
    model = c.register_spec(TINY)
    nb = TINY.block_nbytes
    conn = c._take()
    cases = [
        ({"model": "nope", "keys": [bytes(32).hex()]}, nb, 404),  # an unknown model
        ({"model": model, "keys": [bytes(32).hex()] * 2}, 2 * nb, 400),  # a key twice
        ({"model": model, "keys": [bytes(32).hex()]}, nb + 1, 400),  # len not one block per key
        ({"model": model, "keys": [bytes([i]) * 32 for i in range(17)]}, 17 * nb, 400),  # over max_blocks_per_request
        ({"model": model, "keys": ["zz"]}, nb, 400),  # not a key
        ({"model": model, "keys": []}, 0, 400),  # no block
    ]
    for args, n, status in cases:
        send_msg(conn.sock, {"op": "put_stream", "args": args, "len": n, "off": 0})
        send_msg(conn.sock, {"ready": n // 2})
        send_msg(conn.sock, {"ready": n, "checksums": [0]})
        answer = recv_msg(conn.sock)
        assert answer["error"]["status"] == status, (args, answer)
    send_msg(conn.sock, {"op": "put_stream", "args": {"model": model, "keys": [bytes(32).hex()]}, "len": nb, "off": len(conn.seg)})
    send_msg(conn.sock, {"ready": nb, "checksums": [0]})
    assert recv_msg(conn.sock)["error"]["field"] == "off"
    c._release(conn)
    assert c.stats()  # the connection still serves requests
    c.close()


def test_a_streamed_put_that_breaks_the_protocol_or_stalls_loses_its_connection():
    d = tempfile.mkdtemp(prefix="kvtier-local-")
    s = ServiceProcess(
        {"KVTIER_API_KEYS": json.dumps(KEYS), "KVTIER_LOCAL_SOCKET": f"{d}/kv.sock", "KVTIER_LOCAL_STREAM_STALL_S": "0.5"}, data_dir=d
    )
    try:
        c = LocalKVTierClient(f"unix://{d}/kv.sock", api_key=KEY_A)
        model = c.register_spec(TINY)
        nb = TINY.block_nbytes
        key = bytes([41]) * 32
        flood = [{"ready": i} for i in range(1, 70)]  # 69 messages for 2 KiB, more than 64 + 2048 / 512: refused
        for progress in ([{"ready": 100}, {"ready": 50}], [{"ready": 2 * nb}], [{"ready": nb // 2, "checksums": [0]}], [[1, 2]], flood):
            conn = c._take()
            _stream_request(conn, model, [key], nb)
            for m in progress:
                send_msg(conn.sock, m)
            answer = recv_msg(conn.sock)
            assert answer["error"]["status"] == 400 and answer["error"]["field"] == "ready", progress
            assert recv_msg(conn.sock) is None  # then the connection ends: its later bytes are no requests
            conn.close()
        conn = c._take()
        _stream_request(conn, model, [key], nb)
        send_msg(conn.sock, {"ready": 10})
        t0 = time.monotonic()
        conn.sock.settimeout(10)
        assert recv_msg(conn.sock) is None  # no next part within local_stream_stall_s: the connection ends
        assert 0.4 < time.monotonic() - t0 < 5
        conn.close()
        assert c.get(model, [key]) == [None]  # nothing was stored by any of them
        bs = blocks(1, seed=24)
        with pytest.raises(ValueError, match="stream_part_bytes"):
            LocalKVTierClient(f"unix://{d}/kv.sock", api_key=KEY_A, stream_part_bytes=100)
        assert c.put(model, [key], bs) == [True]  # and the server serves new connections
        assert torch.equal(c.get(model, [key])[0], bs[0])
        c.close()
    finally:
        s.stop()


def test_the_async_sdk_on_a_unix_url_uses_the_local_transport(server):
    import asyncio

    from kvtier.service.client import AsyncKVTierClient
    from kvtier.service.local_client import AsyncLocalKVTierClient

    async def run():
        async with AsyncKVTierClient(server.socket, api_key=KEY_A) as c:
            assert isinstance(c, AsyncLocalKVTierClient)
            model = await c.register_spec(TINY)
            toks = tokens(4, seed=25)
            keys = await c.hashes(model, toks)
            bs = blocks(4, seed=25)
            # awaited at once: each call on a worker thread, on a connection of its own
            assert await asyncio.gather(*(c.put(model, [k], bs[i : i + 1]) for i, k in enumerate(keys))) == [[True]] * 4
            got = await c.get(model, keys)
            assert all(torch.equal(g, b) for g, b in zip(got, bs))
            lookups = await asyncio.gather(*(c.lookup(model, token_ids=toks) for _ in range(8)))
            assert {lk.num_blocks for lk in lookups} == {4}
            with pytest.raises(KVTierError) as e:
                await c.get("nope", keys)
            assert e.value.status == 404
            other = await c.register_spec(KVSpec("tiny-gone", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=16))
            assert await c.unregister_spec(other) is True
            with pytest.raises(KVTierError) as e:
                await c.unregister_spec(other)
            assert e.value.status == 404

    asyncio.run(run())
    c = KVTierClient(server.socket, api_key=KEY_A)  # the synchronous client unregisters over the local transport too
    gone = c.register_spec(KVSpec("tiny-gone-2", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=16))
    assert c.unregister_spec(gone) is True
    c.close()


def test_streamed_puts_from_threads_with_deletes_never_return_wrong_blocks(stream_server):
    # four threads put, read back, retrieve and delete their own blocks at once: buffers the host tier lends,
    # adopts and recycles (and the summaries made from them after each answer) never mix two blocks
    server = stream_server
    c = LocalKVTierClient(server.socket, api_key=KEY_A, stream_part_bytes=1024)
    model = c.register_spec(TINY)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for r in range(6):
                seed = 1000 + 10 * t + r
                bs = blocks(3, seed=seed)
                keys = [bytes([60 + t, r, i]) + bytes(29) for i in range(3)]
                assert c.put(model, keys, bs) == [True] * 3
                got = c.get(model, keys)
                assert all(g is not None and torch.equal(g, b) for g, b in zip(got, bs)), (t, r)
                if r % 2:
                    q = torch.randn(TINY.num_layers, 2 * TINY.num_kv_heads, TINY.head_dim, generator=torch.Generator().manual_seed(seed))
                    assert c.retrieve(model, q.to(TINY.torch_dtype), budget=40, hashes=keys).num_blocks == 3
                assert c.delete(model, keys) == 3
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors[0]
    c.close()
