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
``ipc://`` or ``inproc://`` is bound, any other is connected to (a subscriber that binds). The stream reads the store's event log (``/v1/events``
serves the same log over REST), every ``KVTIER_KV_EVENTS_INTERVAL_S`` seconds, at most
``max_events_per_request`` events a batch.
"""

from __future__ import annotations

import logging
import threading
import time
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
    """A thread that publishes the store's new events on a ZMQ PUB socket, in vLLM's wire format.

    ``read(after, limit)`` returns ``(events, next_after)`` with events as ``(kind, key, tier, block_size)``.
    """

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
    ) -> None:
        import zmq

        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise ValueError(f"kv_events_endpoint must be a ZMQ endpoint such as 'tcp://127.0.0.1:5557', got {endpoint!r}")
        ctx: zmq.Context = zmq.Context.instance()
        self._pub = ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):  # vLLM's rule
            self._pub.bind(endpoint)
        else:
            self._pub.connect(endpoint)
        self.endpoint = endpoint
        self._read = read
        self._topic = topic.encode()
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._cursor = start_after  # only events after the service started: a subscriber wanting the past asks /v1/events
        self._seq = 0
        self._stop = threading.Event()
        self._publish_lock = threading.Lock()  # the thread and callers (a delete, before it forgets the owners)
        self._thread = threading.Thread(target=self._run, name="kvtier-kv-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.publish_pending()
            except Exception:  # the event stream is best effort; the service goes on
                log.exception("publishing KV events failed")

    def publish_pending(self) -> int:
        """Publish every event not yet published (in batches); the number published. Thread-safe."""
        with self._publish_lock:
            return self._publish_pending()

    def _publish_pending(self) -> int:
        total = 0
        while True:
            events, cursor = self._read(self._cursor, self._max_batch)
            if cursor == self._cursor:
                return total
            self._cursor = cursor
            if not events:
                continue
            wire = [event_to_wire(kind, key, tier, bs) for kind, key, tier, bs in events]
            self._pub.send_multipart((self._topic, self._seq.to_bytes(8, "big"), encode_batch(time.time(), wire)))
            self._seq += 1
            total += len(wire)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.publish_pending()  # what happened before the stop
        except Exception:
            pass
        self._pub.close(linger=500)
