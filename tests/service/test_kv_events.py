"""``kvtier serve`` publishes its store's events on ZMQ in vLLM's KV-event wire format (``service.kv_events``).

The format is checked here against vLLM's layout as written in ``vllm/distributed/kv_events.py``
(``(topic, seq, msgpack([ts, events, dp_rank]))``, tagged ``BlockStored``/``BlockRemoved`` maps); the
real-engine module (``test_vllm_engine.py``) decodes the same bytes with vLLM's own ``KVEventBatch``.
"""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import torch

from kvtier.service.client import KVTierClient
from kvtier.service.kv_events import encode_batch, event_to_wire

from .conftest import TINY
from .server import ServiceProcess

zmq = pytest.importorskip("zmq")


def receive(sub, timeout_ms: int = 10_000) -> tuple[bytes, int, list]:
    if not sub.poll(timeout_ms):
        raise AssertionError("no KV event batch arrived")
    topic, seq, payload = sub.recv_multipart()
    ts, events, rank = msgpack.unpackb(payload)
    assert isinstance(ts, float) and rank == 0
    return topic, int.from_bytes(seq, "big"), events


def test_wire_encoding_matches_vllm_layout():
    e = event_to_wire("stored", b"k" * 32, "host", 16)
    assert e == {
        "type": "BlockStored",
        "block_hashes": [b"k" * 32],
        "parent_block_hash": None,
        "token_ids": [],
        "block_size": 16,
        "lora_id": None,
        "medium": "kvtier/host",
        "lora_name": None,
    }
    assert event_to_wire("removed", b"k" * 32, "disk", None) == {
        "type": "BlockRemoved",
        "block_hashes": [b"k" * 32],
        "medium": "kvtier/disk",
    }
    assert msgpack.unpackb(encode_batch(1.5, [e])) == [1.5, [e], 0]
    with pytest.raises(ValueError):
        event_to_wire("moved", b"k", "host", 1)


def test_serve_publishes_stored_and_removed_events(tmp_path):
    endpoint = f"ipc://{tmp_path}/events.ipc"  # bound by the service (ipc://, as in vLLM); the subscriber connects
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.connect(endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    svc = ServiceProcess({"KVTIER_KV_EVENTS_ENDPOINT": endpoint, "KVTIER_KV_EVENTS_TOPIC": "kv"})
    try:
        with KVTierClient(svc.url) as c:
            model = c.register_spec(TINY)
            tokens = np.random.default_rng(5).integers(0, 50_000, TINY.block_tokens * 2).tolist()
            keys = c.hashes(model, tokens)
            blocks = torch.randn(2, *TINY.block_shape).to(TINY.torch_dtype)
            # a PUB socket drops what it sends before the subscription reaches it: put until a batch arrives
            for _ in range(50):
                c.put(model, keys, blocks)
                if sub.poll(200):
                    break
            topic, seq, events = receive(sub)
            assert topic == b"kv" and seq == 0
            stored = [e for e in events if e["type"] == "BlockStored"]
            assert stored and stored[0]["block_hashes"][0] in keys  # the keys the client uses, not storage keys
            assert stored[0]["medium"].startswith("kvtier/") and stored[0]["block_size"] == TINY.block_tokens
            c.delete(model, keys)
            seen, last = [], seq
            for _ in range(10):
                _, last_seq, evs = receive(sub)
                assert last_seq == last + 1  # consecutive batches
                last = last_seq
                seen += [e for e in evs if e["type"] == "BlockRemoved"]
                if {k for e in seen for k in e["block_hashes"]} >= set(keys):
                    break
            assert {k for e in seen for k in e["block_hashes"]} >= set(keys)
    finally:
        svc.stop()
        sub.close(linger=0)


def test_a_publisher_that_connects_loses_no_batch_and_replays_on_request():
    """ZMQ's slow joiner: a publisher connecting to a subscriber that binds sends before the connection and
    the subscription exist. Nothing may be lost: batches wait for the first subscription, in order, and the
    replay socket hands back every kept batch from a sequence number (vLLM's replay protocol)."""
    from kvtier.service.kv_events import KVEventPublisher

    from tests.redis_servers import free_port

    log: list[tuple[str, bytes, str, int | None]] = []

    def read(after: int, limit: int):
        got = log[after : after + limit]
        return got, after + len(got)

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    replay_port = free_port(avoid={port})
    pub = KVEventPublisher(
        f"tcp://127.0.0.1:{port}", read, interval_s=3600, max_batch=2, replay_endpoint=f"tcp://127.0.0.1:{replay_port}", buffer_batches=4
    )
    dealer = ctx.socket(zmq.DEALER)
    try:
        log += [("stored", bytes([i]) * 32, "host", 16) for i in range(5)]
        assert pub.publish_pending() == 5  # at once, before the connection: batched and held, not dropped
        for _ in range(100):
            # a SUB socket that binds sends its subscription to a new peer only once its own thread touches the
            # socket (here: poll): until then a plain PUB would drop every batch
            if sub.poll(50) or pub.subscribed:
                break
            pub.publish_pending()
        pub.publish_pending()  # the held batches go out once the subscription has arrived
        got = [receive(sub, 5000) for _ in range(3)]  # 5 events, 2 a batch
        assert [seq for _, seq, _ in got] == [0, 1, 2]
        assert [e["block_hashes"][0][0] for _, _, evs in got for e in evs] == [0, 1, 2, 3, 4]
        log.append(("removed", b"\x09" * 32, "host", None))
        pub.publish_pending()
        assert receive(sub)[1] == 3  # live batches follow once subscribed
        dealer.connect(f"tcp://127.0.0.1:{replay_port}")
        dealer.send_multipart((b"", (1).to_bytes(8, "big")))
        replayed = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pub.publish_pending()  # the publisher's thread ticks hourly here: serve the request by hand
            if dealer.poll(100):
                _, _, seq, payload = dealer.recv_multipart()
                if int.from_bytes(seq, "big", signed=True) == -1:
                    break
                replayed.append((int.from_bytes(seq, "big"), msgpack.unpackb(payload)[1]))
        assert [s for s, _ in replayed] == [1, 2, 3]
        assert replayed[-1][1][0]["type"] == "BlockRemoved"
    finally:
        pub.close()
        sub.close(linger=0)
        dealer.close(linger=0)
