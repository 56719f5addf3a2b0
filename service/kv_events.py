"""KV events on a ZMQ socket in vLLM's wire format, so a KV-aware router that subscribes to vLLM engines
subscribes to kvtier the same way.

vLLM's ``ZmqEventPublisher`` (``vllm/distributed/kv_events.py``) sends, per batch, a three-part
message ``(topic, seq, payload)``: ``seq`` an 8-byte big-endian counter from 0, ``payload`` the
msgpack encoding of ``KVEventBatch`` (a msgspec struct encoded as an array)::

    [ts, [event, ...], data_parallel_rank]
    event = {"type": "BlockStored", "block_hashes": [key], "parent_block_hash": None, "token_ids": [],
             "block_size": T, "lora_id": None, "medium": "kvtier/host", "lora_name": None}
          | {"type": "BlockRemoved", "block_hashes": [key], "medium": "kvtier/disk"}

kvtier's events are per tier: a block promoted from disk to host is ``BlockStored`` with medium
``kvtier/host``; evicted from a tier, ``BlockRemoved`` with that tier. ``block_hashes`` are the
keys engines use (the vLLM connector's chain keys, a tenant's client keys; the storage key where
the owner is no longer remembered), ``block_size`` the model's ``block_tokens``; the service does
not keep token ids or parents, so those are empty. ``kvtier serve`` publishes when
``KVTIER_KV_EVENTS_ENDPOINT`` is set; as in vLLM, an endpoint with ``*`` (``tcp://*:5557``), ``::``,
``ipc://`` or ``inproc://`` is bound, any other is connected to (a subscriber that binds). The
stream reads the store's event log (``/v1/events`` serves the same log over REST), every
``KVTIER_KV_EVENTS_INTERVAL_S`` seconds, at most ``max_events_per_request`` events a batch. Nothing
is sent before a subscription arrives (no batch lost to ZMQ's slow joiner, bound or connected), and
the last ``KVTIER_KV_EVENTS_BUFFER_BATCHES`` batches can be replayed from
``KVTIER_KV_EVENTS_REPLAY_ENDPOINT`` (``KVEventPublisher``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Any, Callable

import msgpack

log = logging.getLogger(__name__)

MEDIUM_PREFIX = "kvtier/"


def event_to_wire(kind: str, key: bytes, tier: str, block_size: int | None) -> dict[str, Any]:
    """One store event as vLLM's tagged ``BlockStored`` / ``BlockRemoved`` map."""
    medium = MEDIUM_PREFIX + tier
    if kind == "stored":
        return {
            "type": "BlockStored",
            "block_hashes": [key],
            "parent_block_hash": None,
            "token_ids": [],
            "block_size": int(block_size or 0),
            "lora_id": None,
            "medium": medium,
            "lora_name": None,
        }
    if kind == "removed":
        return {"type": "BlockRemoved", "block_hashes": [key], "medium": medium}
    raise ValueError(f"event kind must be 'stored' or 'removed', got {kind!r}")


def encode_batch(ts: float, events: list[dict[str, Any]], data_parallel_rank: int = 0) -> bytes:
    """``KVEventBatch`` as msgspec encodes it (array-like: ``[ts, events, data_parallel_rank]``)."""
    return msgpack.packb([ts, events, data_parallel_rank], use_bin_type=True)


class KVEventPublisher:
    """A thread that publishes the store's new events on a ZMQ socket, in vLLM's wire format.

    ``read(after, limit)`` returns ``(events, next_after)`` with events as ``(kind, key, tier, block_size)``.

    No batch is lost to ZMQ's slow joiner: the socket is an ``XPUB`` (a ``SUB`` subscriber sees a
    plain publisher) and nothing is sent before the first subscription reaches it; the batches made
    until then wait in a bounded buffer and go out, in order, when it does. That matters most for a
    publisher that connects to a subscriber which binds: the connection, then the subscription, are
    established asynchronously, and a plain ``PUB`` drops whatever it sends before both arrive. The
    last ``buffer_batches`` batches are kept for replay: with ``replay_endpoint`` set, a ``ROUTER``
    socket bound there answers a request ``(b"", start_seq)`` (8 bytes, big-endian; from a ``DEALER``)
    with every kept batch ``(b"", topic, seq, payload)`` from ``start_seq`` on, then ``(b"", b"", -1, b"")``
    (vLLM 0.32's replay protocol), so a subscriber that sees a gap in ``seq`` can fetch what it missed.
    """

    END_SEQ = (-1).to_bytes(8, "big", signed=True)

    def __init__(
        self,
        endpoint: str,
        read: Callable[[int, int], tuple[list[tuple[str, bytes, str, int | None]], int]],
        *,
        topic: str = "",
        interval_s: float = 0.05,
        max_batch: int = 1000,
        start_after: int = 0,
        hwm: int = 100_000,
        replay_endpoint: str | None = None,
        buffer_batches: int = 10_000,
    ) -> None:
        import zmq

        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise ValueError(f"kv_events_endpoint must be a ZMQ endpoint such as 'tcp://127.0.0.1:5557', got {endpoint!r}")
        if replay_endpoint is not None and (not isinstance(replay_endpoint, str) or "://" not in replay_endpoint):
            raise ValueError(f"kv_events_replay_endpoint must be a ZMQ endpoint such as 'tcp://*:5558', got {replay_endpoint!r}")
        if isinstance(buffer_batches, bool) or not isinstance(buffer_batches, int) or buffer_batches < 1:
            raise ValueError(f"buffer_batches must be a positive int, got {buffer_batches!r}")
        self._zmq = zmq
        ctx: zmq.Context = zmq.Context.instance()
        self._pub = ctx.socket(zmq.XPUB)
        self._pub.set_hwm(hwm)
        self._replay = None
        try:
            if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):  # vLLM's rule
                self._pub.bind(endpoint)
            else:
                self._pub.connect(endpoint)
            if replay_endpoint is not None:
                self._replay = ctx.socket(zmq.ROUTER)
                self._replay.bind(replay_endpoint)
        except zmq.ZMQError:
            self._pub.close(linger=0)
            if self._replay is not None:
                self._replay.close(linger=0)
            raise
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self._read = read
        self._topic = topic.encode()
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._cursor = start_after  # only events after the service started: a subscriber wanting the past asks /v1/events
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_batches)  # (seq, payload): the replay buffer
        self._next_send = 0  # the first seq not yet sent (everything before the first subscription waits)
        self.subscribed = False  # a subscription has reached the socket
        self._stop = threading.Event()
        self._publish_lock = threading.Lock()  # every socket call: the thread and callers (a delete, before it forgets the owners)
        self._thread = threading.Thread(target=self._run, name="kvtier-kv-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.publish_pending()
            except Exception:  # the event stream is best effort; the service goes on
                log.exception("publishing KV events failed")

    def publish_pending(self) -> int:
        """Publish every event not yet published (in batches); the number of events batched. Thread-safe."""
        with self._publish_lock:
            self._take_subscriptions()
            self._serve_replay()
            return self._publish_pending()

    def _take_subscriptions(self) -> None:
        zmq = self._zmq
        while True:
            try:
                msg = self._pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":  # XPUB hands up (un)subscriptions: 1 + topic subscribes
                self.subscribed = True

    def _serve_replay(self) -> None:
        if self._replay is None:
            return
        zmq = self._zmq
        for _ in range(16):  # a few requests per tick: the live stream goes first
            try:
                frames = self._replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("ignoring a malformed KV-event replay request (%d frames)", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in self._buffer:
                if seq >= start_seq:
                    self._replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
            self._replay.send_multipart((client, b"", b"", self.END_SEQ, b""))

    def _publish_pending(self) -> int:
        total = 0
        while True:
            events, cursor = self._read(self._cursor, self._max_batch)
            if cursor == self._cursor:
                break
            self._cursor = cursor
            if not events:
                continue
            wire = [event_to_wire(kind, key, tier, bs) for kind, key, tier, bs in events]
            self._buffer.append((self._seq, encode_batch(time.time(), wire)))
            self._seq += 1
            total += len(wire)
        if self.subscribed and self._next_send < self._seq:
            first = self._buffer[0][0] if self._buffer else self._seq
            if self._next_send < first:
                log.warning("KV events: batches %d..%d left the buffer before any subscriber joined", self._next_send, first - 1)
            for seq, payload in itertools.islice(self._buffer, max(0, self._next_send - first), None):
                self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
            self._next_send = self._seq
        return total

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.publish_pending()  # what happened before the stop
        except Exception:
            pass
        with self._publish_lock:
            self._pub.close(linger=500)
            if self._replay is not None:
                self._replay.close(linger=0)
