"""RedisTier: blocks as checksummed frames in Redis — one node, TLS, or a Redis Cluster.

One block is one frame (``kvstore.frames``) under one key, written with one ``SET``: there is no
second key and no ordering protocol, so a reader sees a whole frame or none. Keys are::

    kvtier:<spec.short_fingerprint>:<block hash hex>

so that one Redis serves several models and ``SCAN kvtier:<short_fingerprint>:*`` lists one model's blocks.
The key deliberately has NO curly braces: ``{...}`` is a Redis Cluster hash tag, and a tag around
the fingerprint would hash every block of a model to the same slot (one node holding the whole
model). Without braces the blocks of a model spread over every primary.

Batches are one round trip: ``MGET`` on a single node, a pipeline of ``GET``s on a cluster
(redis-py splits a cluster pipeline by node), non-transactional pipelines of ``SET`` / ``EXISTS``
/ ``DEL`` for the rest.

Faults never reach the caller. When Redis is unreachable (connection refused, timeouts, cluster
down, ...) a call degrades — ``get``: all misses, ``put``: all 0, ``contains``: all False,
``remove``: 0 — counts one ``error``, and opens a circuit: for ``retry_interval_s`` after a failure
calls degrade at once without touching the network, then the next call tries Redis again, so the
tier recovers by itself. A warning is logged when Redis becomes unreachable, at most every
``_WARN_EVERY_S`` while it stays so, and once when it is back.

Accounting (``capacity_bytes``, ``used_bytes``, ``stats().blocks/bytes``) is per instance and
approximate: it counts the frames *this* instance wrote and has not seen removed, expired or
missing. Other instances sharing the Redis, Redis' own eviction (``maxmemory``) and TTL expiry
are invisible to it until a read or a capacity check notices. ``capacity_bytes=None`` leaves the
bound to Redis' ``maxmemory``. After Redis comes back from an outage, the accounting is checked
against what Redis holds (one pipelined ``EXISTS`` per tracked key), so a Redis that restarted
empty is not reported as still holding the old blocks.

Coherence: instances sharing a Redis keep their own copies of blocks in faster tiers. With
``publish_invalidations`` every ``SET`` and ``DEL`` is announced in the capped stream
``kvtier-invalidations`` (in the same pipeline), and ``listen_invalidations`` hands other instances'
announcements to a callback (``TieredStore.drop_local_copies``), so an instance drops a block
that another deleted or rewrote within one blocking ``XREAD`` (about a millisecond on a LAN).
A delete that Redis did not confirm (down, the circuit open, or an error in its place in the
pipeline) is remembered and sent again once Redis answers; meanwhile reads of that key are misses,
so a deleted block never comes back. With ``pending_deletes_path`` the remembered deletes are also
appended (and fsynced) to that file before the delete returns, and read back at the next start:
a ``kill -9`` between the acknowledgement and Redis' confirmation cannot bring the old copy back.
A put of a key whose delete is pending keeps the delete pending until Redis confirmed the new
value (a refused put leaves the old copy unreadable, never current).

Membership without a round trip: ``view`` (``kvstore.membership.MembershipView``) remembers, per
key, what this instance last saw of it in Redis: its own writes, reads, deletes and ``contains``
answers, and other instances' announced writes and deletes. ``contains_cached`` answers from it
with no I/O; ``TieredStore.lookup`` uses it when Redis does not answer within its bound.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
import torch
from redis.cluster import RedisCluster
from redis.exceptions import DataError, OutOfMemoryError, RedisClusterException, RedisError, ResponseError

from ..codecs import Codec, codec_for_block, get_codec
from ..frames import FrameError, FrameIncomplete, decode_frame, decode_frame_header, encode_frame, header_read_size
from ..keys import check_keys
from ..membership import MembershipView
from ..spec import KVSpec
from .base import TierBase, TierCapabilities

log = logging.getLogger(__name__)

T = TypeVar("T")

KEY_PREFIX = "kvtier"
# announcements of writes and deletes: a capped stream of entries {m: "S"|"D" + 8-byte instance id + redis keys joined by "\n"}
INVALIDATION_STREAM = b"kvtier-invalidations"
INVALIDATION_STREAM_LEN = 10_000
MAX_PENDING_DELETES = 100_000  # unconfirmed deletes remembered (the oldest are forgotten beyond it)
# RedisError covers ConnectionError, TimeoutError, ClusterDownError, SlotNotCoveredError and
# server replies such as NOAUTH or LOADING; RedisClusterException (not a RedisError) is what the
# cluster client raises when no node answers; OSError covers TLS and socket errors that escape
# redis-py. Anything else (our own ValueErrors) is a bug and raises.
_BACKEND_ERRORS = (RedisError, RedisClusterException, OSError)
_PIPELINE_BYTES = 64 << 20  # a put sends its SETs in pipelines of about this many bytes
# Bytes per socket read. redis-py's default (64 KiB) means hundreds of read+parse rounds per
# multi-MiB frame; 1 MiB measured ~10% faster gets of 6-32 MiB frames. One buffer per connection.
_SOCKET_READ_BYTES = 1 << 20
_WARN_EVERY_S = 30.0
_MAX_OFFSETS = 1 << 20  # payload offsets remembered for range reads (forgotten all at once beyond)
_SCHEMES = {  # scheme -> (tls, cluster)
    "redis": (False, False),
    "rediss": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}


class _Down:
    """The result of a call that did not reach Redis (circuit open or backend error)."""


_DOWN = _Down()


# -- wire ------------------------------------------------------------------------------------
class _ZeroCopyPacker:
    """Packs a command into RESP without copying its large arguments.

    redis-py's default packer (hiredis) copies the whole command, frame included, into one new
    bytes object — measured at ~250 MiB/s for 1-32 MiB values, far below the socket. This packer
    returns the small pieces joined and each large argument as its own buffer; the connection
    sends them one after the other.
    """

    CUTOFF = 16 * 1024

    def pack(self, *args) -> list:
        if isinstance(args[0], str):  # "CLIENT SETINFO" and friends arrive as one string
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        out: list = []
        head = bytearray(b"*%d\r\n" % len(args))
        for arg in args:
            arg = _encode_arg(arg)
            size = arg.nbytes if isinstance(arg, memoryview) else len(arg)
            head += b"$%d\r\n" % size
            if size > self.CUTOFF:
                out.append(bytes(head))
                out.append(arg)
                head = bytearray(b"\r\n")
            else:
                head += arg
                head += b"\r\n"
        out.append(bytes(head))
        return out


def _encode_arg(arg) -> bytes | memoryview:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, (bytearray, memoryview)):
        return memoryview(arg).cast("B")
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool):
        raise DataError("a bool is not a valid Redis argument; convert it to an int, bytes or str first")
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    raise DataError(f"invalid Redis argument of type {type(arg).__name__}")


class _Connection(redis.Connection):
    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("command_packer", _ZeroCopyPacker())
        super().__init__(**kwargs)


class _SSLConnection(redis.SSLConnection):
    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("command_packer", _ZeroCopyPacker())
        super().__init__(**kwargs)


# -- the tier --------------------------------------------------------------------------------
class RedisTier(TierBase):
    """A tier in Redis: ``redis://``, ``rediss://`` (TLS), ``redis+cluster://``, ``rediss+cluster://``.

    Args:
        url: where Redis is, e.g. ``redis://127.0.0.1:6379/0`` or ``redis+cluster://10.0.0.5:7000``
            (any one node of the cluster; the others are discovered).
        codec: name or instance of the codec that encodes blocks on ``put``. ``get`` decodes with
            the codec named in each frame, so blocks written with another codec stay readable.
        capacity_bytes: bytes of frames this instance may hold (see the module docstring); ``None``:
            bounded by Redis' ``maxmemory``.
        ttl_s: expiry of every written block (``PX``), or ``None`` to keep blocks until evicted.
        socket_timeout_s, connect_timeout_s: bounds of one socket read/write and of a connect.
        retry_interval_s: how long calls degrade without trying after a backend error.
        ssl_ca_certs: CA file to verify the server with (TLS urls only; default: system CAs).
        max_connections: connection pool size (per node on a cluster); callers beyond it wait up
            to ``socket_timeout_s`` for a connection.
        view_max_keys: keys remembered in ``view``, the membership this instance last saw (least
            recently updated forgotten first); lookups read it when Redis is slow (``contains_cached``).
    """

    capabilities = TierCapabilities(device="redis", persistent=True, shared=True, framed=True, iterable=True, range_reads=True)

    def __init__(
        self,
        url: str,
        *,
        codec: str | Codec = "identity",
        capacity_bytes: int | None = None,
        ttl_s: float | None = None,
        name: str = "redis",
        socket_timeout_s: float = 2.0,
        connect_timeout_s: float = 1.0,
        retry_interval_s: float = 1.0,
        ssl_ca_certs: str | os.PathLike | None = None,
        max_connections: int = 64,
        publish_invalidations: bool = False,
        cipher=None,
        pending_deletes_path: str | os.PathLike | None = None,
        view_max_keys: int = 1 << 18,
    ) -> None:
        self._tls, self._cluster, self._url = _parse_url(url)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if isinstance(codec, str):
            codec = get_codec(codec)
        elif not isinstance(codec, Codec):
            raise ValueError(f"codec must be a codec name or a Codec, got {type(codec).__name__}")
        _check_number("socket_timeout_s", socket_timeout_s, positive=True)
        _check_number("connect_timeout_s", connect_timeout_s, positive=True)
        _check_number("retry_interval_s", retry_interval_s, positive=False)
        if ttl_s is not None:
            _check_number("ttl_s", ttl_s, positive=True)
        if not isinstance(max_connections, int) or isinstance(max_connections, bool) or max_connections < 1:
            raise ValueError(f"max_connections must be a positive int, got {max_connections!r}")
        if ssl_ca_certs is not None:
            if not self._tls:
                raise ValueError(f"ssl_ca_certs is for rediss:// urls only, got a {url.split(':', 1)[0]}:// url")
            if not os.path.isfile(ssl_ca_certs):
                raise ValueError(f"ssl_ca_certs must be an existing file, got {os.fspath(ssl_ca_certs)!r}")
        super().__init__(name, codec, capacity_bytes)

        self.ttl_s = ttl_s
        self.retry_interval_s = float(retry_interval_s)
        self._ttl_ms = None if ttl_s is None else max(1, round(ttl_s * 1000))
        split = urlsplit(self._url)
        self._where = f"{split.hostname}:{split.port or 6379}"  # for log lines: never the password
        self._client_opts: dict[str, Any] = dict(
            socket_timeout=float(socket_timeout_s),
            socket_connect_timeout=float(connect_timeout_s),
            max_connections=max_connections,
            timeout=float(socket_timeout_s),  # BlockingConnectionPool: wait for a free connection
            connection_pool_class=redis.BlockingConnectionPool,
            connection_class=_SSLConnection if self._tls else _Connection,
            socket_read_size=_SOCKET_READ_BYTES,
        )
        if ssl_ca_certs is not None:
            self._client_opts["ssl_ca_certs"] = os.fspath(ssl_ca_certs)
        self._client: redis.Redis | RedisCluster | None = None  # made on first use
        self._client_lock = threading.Lock()
        self._closed = False
        self._codecs: dict[str, Codec] = {codec.name: codec}
        # Local accounting: redis key -> (frame bytes, expiry on time.monotonic() or None).
        self._sizes: dict[bytes, tuple[int, float | None]] = {}
        # Range reads: redis key -> where the payload starts in its frame (from a header read).
        self._data_offset: dict[bytes, int] = {}
        # circuit and rate-limited warnings
        self._down_until = 0.0
        self._failing = False  # the last call failed
        self._announced = False  # a warning said so, and no "reachable again" followed yet
        self._last_warn = -math.inf
        self._degraded_since_warn = 0
        # coherence across instances (see the module docstring): every SET and DEL is announced
        self.publish_invalidations = bool(publish_invalidations)
        self.cipher = cipher  # kvstore.crypto.FrameCipher: every value encrypted, unopenable ones are corrupt
        # deletes Redis did not confirm: sent again once it answers; reads of these keys are misses meanwhile
        self._pending_deletes: OrderedDict[bytes, None] = OrderedDict()
        self._pending_lock = threading.Lock()  # orders a retried DEL before a later SET of the same key
        self._journal_lock = threading.Lock()  # one writer of pending_deletes_path at a time
        self.pending_deletes_dropped = 0
        # the same, durable: appended before a delete returns, rewritten when deletes are confirmed
        self.pending_deletes_path = None if pending_deletes_path is None else os.fspath(pending_deletes_path)
        if self.pending_deletes_path is not None:
            self._load_pending_deletes()
        self.instance_id = os.urandom(8)
        self._listener: threading.Thread | None = None
        # what this instance last saw of each key (its writes, reads, deletes, checks, other instances'
        # announcements): lookups answer from it when Redis is slow (``contains_cached``)
        self.view = MembershipView(view_max_keys)

    def __repr__(self) -> str:
        kind = "cluster" if self._cluster else "node"
        return f"RedisTier(name={self.name!r}, {kind} {self._where}, tls={self._tls}, codec={self.codec.name!r})"

    # -- keys ------------------------------------------------------------------------------
    @staticmethod
    def key_prefix(spec: KVSpec) -> bytes:
        """``kvtier:<short_fingerprint>:`` — every Redis key of ``spec``'s blocks starts with it."""
        return f"{KEY_PREFIX}:{spec.short_fingerprint}:".encode()

    def redis_key(self, key: bytes, spec: KVSpec) -> bytes:
        """The Redis key of one block (no hash tag: see the module docstring)."""
        return self.key_prefix(spec) + bytes(key).hex().encode()

    def _redis_keys(self, keys: Sequence[bytes], spec: KVSpec) -> list[bytes]:
        prefix = self.key_prefix(spec)
        return [prefix + k.hex().encode() for k in check_keys(keys)]

    # -- protocol --------------------------------------------------------------------------
    def contains(self, keys: Sequence[bytes], *, spec: KVSpec) -> list[bool]:
        rkeys = self._redis_keys(keys, spec)
        if not rkeys:
            return []
        since = self.view.mark()
        replies = self._call(lambda c: self._pipelined(c, "EXISTS", rkeys))
        if replies is _DOWN:
            return [False] * len(rkeys)
        self._check_replies(replies)
        pending = self._pending_deletes
        out = [r == 1 and k not in pending for k, r in zip(rkeys, replies)]  # an error in place of a reply is a False
        answered = [i for i, r in enumerate(replies) if not isinstance(r, Exception)]
        self.view.note([rkeys[i] for i in answered], [out[i] for i in answered], until=self._seen_until(), since=since)
        return out

    def contains_cached(self, keys: Sequence[bytes], *, spec: KVSpec) -> list[bool | None]:
        """Per key, what this instance last saw of it in Redis, without asking Redis: True (present),
        False (absent, deleted, or expired by ``ttl_s``), None (never seen). Learnt from this
        instance's writes, reads, deletes and ``contains`` calls, and from other instances'
        announcements once ``listen_invalidations`` runs. May be stale in both directions."""
        rkeys = self._redis_keys(keys, spec)
        known = self.view.known(rkeys)
        pending = self._pending_deletes
        if pending:
            known = [False if k in pending else v for k, v in zip(rkeys, known)]
        return known

    def _seen_until(self) -> float:
        """How long a block seen present now stays so (``ttl_s``), on ``time.monotonic()``."""
        return math.inf if self.ttl_s is None else time.monotonic() + self.ttl_s

    def put(self, keys: Sequence[bytes], blocks: Sequence[torch.Tensor], *, spec: KVSpec, first: Sequence[bool] | None = None) -> list[int]:
        self._check_put(keys, blocks, spec, first)
        rkeys = self._redis_keys(keys, spec)
        if not rkeys:
            return []
        if self._pending_deletes:
            self.retry_deletes()
            if any(k in self._pending_deletes for k in rkeys):
                # A delete of some of these keys is still pending: Redis may hold their old values.
                # Holding the lock orders our SETs after any retried DEL; the deletes stay pending
                # (old values unreadable) until Redis confirmed the new ones.
                with self._pending_lock:
                    sizes = self._put_unlocked(keys, blocks, rkeys, spec, first)
                    with self._lock:
                        confirmed = [k for k, n in zip(rkeys, sizes) if n > 0 and self._pending_deletes.pop(k, False) is None]
                    if confirmed:
                        self._save_pending_deletes()
                    return sizes
        return self._put_unlocked(keys, blocks, rkeys, spec, first)

    def _put_unlocked(self, keys, blocks, rkeys: list[bytes], spec: KVSpec, first) -> list[int]:
        sizes = [0] * len(rkeys)
        codec = self.codec
        reserved: dict[int, tuple[bytes, int, int]] = {}  # index -> (redis key, frame bytes, bytes reserved)

        def send(client) -> None:
            pipe = client.pipeline(transaction=False)
            batch: list[int] = []
            batch_bytes = 0
            for i, (key, block) in enumerate(zip(keys, blocks)):
                c = codec_for_block(codec, bool(first[i])) if first is not None else codec
                payload, meta = c.encode(block, spec)
                frame = encode_frame(bytes(key), spec, c.name, meta, spec.block_shape, spec.dtype, payload)
                if self.cipher is not None:
                    frame = self.cipher.seal(bytes(key), frame)
                delta = self._reserve(rkeys[i], len(frame))
                if delta is None:
                    continue  # refused for lack of room: sizes[i] stays 0
                reserved[i] = (rkeys[i], len(frame), delta)
                pipe.set(rkeys[i], frame, px=self._ttl_ms)
                batch.append(i)
                batch_bytes += len(frame)
                if batch_bytes >= _PIPELINE_BYTES:
                    self._announce(pipe, b"S", [rkeys[j] for j in batch])
                    self._settle_puts(batch, pipe.execute(raise_on_error=False), reserved, sizes)
                    batch, batch_bytes = [], 0
            if batch:
                self._announce(pipe, b"S", [rkeys[j] for j in batch])
                self._settle_puts(batch, pipe.execute(raise_on_error=False), reserved, sizes)

        try:
            self._call(send)  # a fault leaves sizes at 0 from the first unconfirmed block on
        finally:
            with self._lock:  # reserved but never confirmed: not written (fault or exception)
                for _, _, delta in reserved.values():
                    self._stats.bytes -= delta
        return sizes

    def get(self, keys: Sequence[bytes], *, spec: KVSpec, out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        """Blocks ``[L, 2, H_kv, T, D]`` of ``spec`` or ``None`` per key (decoded into ``out[i]`` when given)."""
        rkeys = self._redis_keys(keys, spec)
        self._check_out(rkeys, out, spec)
        result: list[torch.Tensor | None] = [None] * len(rkeys)
        if not rkeys:
            return result
        if self._pending_deletes and any(k in self._pending_deletes for k in rkeys):
            self.retry_deletes()
            pending = self._pending_deletes
            ask = [i for i, k in enumerate(rkeys) if k not in pending]  # a deleted block is a miss until Redis drops it
            if len(ask) < len(rkeys):
                with self._lock:
                    self._stats.misses += len(rkeys) - len(ask)
                got = self.get([keys[i] for i in ask], spec=spec, out=None if out is None else [out[i] for i in ask]) if ask else []
                for i, block in zip(ask, got):
                    result[i] = block
                return result
        since = self.view.mark()
        if self._cluster:  # redis-py sends a cluster pipeline to each node in one go
            replies = self._call(lambda c: self._pipelined(c, "GET", rkeys))
        else:
            replies = self._call(lambda c: c.mget(rkeys))
        if replies is _DOWN:
            with self._lock:
                self._stats.misses += len(rkeys)
            return result
        corrupt: list[bytes] = []
        gone: list[bytes] = []
        reasons: list[str] = []
        failed = 0
        fault: Exception | None = None
        for i, buf in enumerate(replies):
            if buf is None:
                gone.append(rkeys[i])
                continue
            if isinstance(buf, Exception):
                if _is_foreign(buf):  # the key holds something that is not a frame
                    corrupt.append(rkeys[i])
                    reasons.append(str(buf))
                else:  # CLUSTERDOWN, TRYAGAIN, ...: a fault, not a verdict on the block
                    failed += 1
                    fault = buf
                continue
            try:
                if self.cipher is not None:
                    buf = self.cipher.open(keys[i], buf)
                frame = decode_frame(buf, expect_key=keys[i], expect_spec=spec)
                codec = self._codec_named(frame.codec)
                result[i] = codec.decode(frame.data, frame.codec_meta, spec, out=None if out is None else out[i])
            except (FrameError, ValueError) as e:  # ValueError: unknown codec or a payload it rejects
                corrupt.append(rkeys[i])
                reasons.append(str(e))
            del buf
        del replies
        self.view.note([rkeys[i] for i, b in enumerate(result) if b is not None], True, until=self._seen_until(), since=since)
        hits = len(rkeys) - len(gone) - len(corrupt) - failed
        with self._lock:
            self._stats.hits += hits
            self._stats.misses += len(gone) + len(corrupt) + failed
            self._stats.corrupt += len(corrupt)
            for rkey in gone:  # evicted, expired or removed elsewhere: stop counting it
                self._forget(rkey)
        if fault is not None:
            self._failed(fault)
        if corrupt:
            log.warning(
                "redis tier %s: %d corrupt frame(s) deleted (first: %s: %s)", self.name, len(corrupt), corrupt[0].decode(), reasons[0]
            )
            self._delete(corrupt)
        return result

    def remove(self, keys: Sequence[bytes], *, spec: KVSpec) -> int:
        rkeys = self._redis_keys(keys, spec)
        if self._pending_deletes:
            self.retry_deletes()
        return self._delete(rkeys) if rkeys else 0

    # -- range reads (paged codecs): pipelined GETRANGEs --------------------------------------
    def _headers(self, keys: list[bytes], rkeys: list[bytes], spec: KVSpec) -> list:
        """Per key, its frame header (``None``: absent, unreadable, or Redis down); one round
        trip (two for headers longer than the first read)."""
        from ..frames import FrameHeader  # noqa: F401  (the type returned)

        headers: list = [None] * len(rkeys)
        todo = {i: header_read_size(spec) for i in range(len(rkeys))}
        for _ in range(6):  # a header is at most 1 MiB: 4 KiB grows to it in 4 rounds
            if not todo:
                break
            idx = list(todo)
            replies = self._call(lambda c: self._pipelined_ranges(c, [(rkeys[i], 0, todo[i]) for i in idx]))
            if replies is _DOWN:
                return headers
            self._check_replies(replies)
            nxt = {}
            for i, buf in zip(idx, replies):
                if not isinstance(buf, (bytes, bytearray)) or not buf:
                    continue
                try:
                    headers[i] = decode_frame_header(buf, expect_key=keys[i], expect_spec=spec)
                except FrameIncomplete as e:
                    if len(buf) >= todo[i] and e.need > todo[i]:
                        nxt[i] = e.need
                except FrameError as e:
                    log.warning("redis tier %s: unreadable frame header %s: %s", self.name, rkeys[i].decode(), e)
            todo = nxt
        with self._lock:
            if len(self._data_offset) > _MAX_OFFSETS:
                self._data_offset.clear()
            for rkey, h in zip(rkeys, headers):
                if h is not None:
                    self._data_offset[rkey] = h.data_offset
        return headers

    def page_layouts(self, keys: Sequence[bytes], *, spec: KVSpec) -> list:
        from ..pages import PageLayout

        rkeys = self._redis_keys(keys, spec)
        out = []
        for key, h in zip(keys, self._headers(list(keys), rkeys, spec)):
            layout = None
            if h is not None:
                try:
                    layout = PageLayout.from_meta(key, spec, h.codec, h.codec_meta)
                except ValueError:
                    layout = None
            out.append(layout)
        return out

    def read_spans(self, requests, *, spec: KVSpec) -> list[list[memoryview] | None]:
        keys = [bytes(k) for k, _ in requests]
        rkeys = self._redis_keys(keys, spec)
        out: list[list[memoryview] | None] = [None] * len(rkeys)
        if not rkeys:
            return out
        unknown = [i for i, r in enumerate(rkeys) if r not in self._data_offset]
        if unknown:
            self._headers([keys[i] for i in unknown], [rkeys[i] for i in unknown], spec)
        cmds, owner = [], []
        for i, (rkey, (_, spans)) in enumerate(zip(rkeys, requests)):
            base = self._data_offset.get(rkey)
            if base is None:
                continue
            for off, n in spans:
                cmds.append((rkey, base + off, n))
                owner.append(i)
        if not cmds:
            return out
        replies = self._call(lambda c: self._pipelined_ranges(c, cmds))
        if replies is _DOWN:
            return out
        self._check_replies(replies)
        got: dict[int, list] = {}
        bad: set[int] = set()
        for i, (_, _, n), buf in zip(owner, cmds, replies):
            if i in bad:
                continue
            if not isinstance(buf, (bytes, bytearray)) or len(buf) != n:  # gone, shorter, or an error
                bad.add(i)
                continue
            got.setdefault(i, []).append(memoryview(buf))
        with self._lock:
            for i in bad:
                self._data_offset.pop(rkeys[i], None)
            for i, views in got.items():
                if i not in bad:
                    out[i] = views
            self._stats.hits += len(got) - len(bad & set(got))
            self._stats.misses += len(rkeys) - (len(got) - len(bad & set(got)))
        return out

    def forget_layouts(self, keys: Sequence[bytes], *, spec: KVSpec) -> None:
        """Drop the payload offsets remembered for ``keys`` (another instance may have rewritten them)."""
        with self._lock:
            for rkey in self._redis_keys(keys, spec):
                self._data_offset.pop(rkey, None)

    @staticmethod
    def _pipelined_ranges(client, cmds: list[tuple[bytes, int, int]]) -> list:
        pipe = client.pipeline(transaction=False)
        for rkey, start, n in cmds:
            pipe.execute_command("GETRANGE", rkey, start, start + n - 1)
        return pipe.execute(raise_on_error=False)

    def _remember_deletes(self, rkeys: list[bytes]) -> None:
        with self._lock:
            for rkey in rkeys:
                self._pending_deletes[rkey] = None
                self._forget(rkey)
            while len(self._pending_deletes) > MAX_PENDING_DELETES:
                self._pending_deletes.popitem(last=False)
                self.pending_deletes_dropped += 1
        self._append_pending_deletes(rkeys)

    # -- the durable record of unconfirmed deletes (``pending_deletes_path``) -----------------
    # One Redis key per line, appended and fsynced before a delete returns; rewritten (atomically)
    # when confirmed deletes leave it. A line may name a key whose delete was confirmed after the
    # last rewrite (a kill -9 in between): sending that DEL again is harmless, because a key leaves
    # the record only after Redis confirmed it, and a put of a pending key rewrites the record
    # before it returns.
    def _load_pending_deletes(self) -> None:
        path = self.pending_deletes_path
        try:
            with open(path, "rb") as f:
                lines = [line.strip() for line in f]
        except FileNotFoundError:
            return
        except OSError as e:
            raise ValueError(f"pending_deletes_path {path!r} cannot be read: {e}") from None
        prefix = KEY_PREFIX.encode() + b":"
        for rkey in lines:
            if rkey.startswith(prefix):  # a torn last line (kill -9 mid-append) is skipped
                self._pending_deletes[rkey] = None
        while len(self._pending_deletes) > MAX_PENDING_DELETES:
            self._pending_deletes.popitem(last=False)
            self.pending_deletes_dropped += 1
        if self._pending_deletes:
            log.warning(
                "redis tier %s: %d delete(s) Redis had not confirmed before the last stop are pending (reads of them miss)",
                self.name,
                len(self._pending_deletes),
            )

    def _append_pending_deletes(self, rkeys: list[bytes]) -> None:
        if self.pending_deletes_path is None or not rkeys:
            return
        with self._journal_lock:
            fd = os.open(self.pending_deletes_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"\n" + b"\n".join(rkeys) + b"\n")  # the leading newline ends a torn line
                os.fsync(fd)
            finally:
                os.close(fd)

    def _save_pending_deletes(self) -> None:
        """Rewrite the record as what is pending now (removed when nothing is)."""
        path = self.pending_deletes_path
        if path is None:
            return
        with self._journal_lock:
            with self._lock:
                pending = list(self._pending_deletes)
            if not pending:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                return
            tmp = f"{path}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"\n".join(pending) + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)

    @property
    def num_pending_deletes(self) -> int:
        return len(self._pending_deletes)

    def retry_deletes(self, batch: int = 1000) -> int:
        """Send again the deletes Redis did not confirm; returns how many it confirmed now."""
        if not self._pending_deletes or not self.available:
            return 0
        done = 0
        with self._pending_lock:
            while self._pending_deletes:
                with self._lock:
                    part = list(itertools.islice(self._pending_deletes, batch))

                def send(client, part=part):
                    pipe = client.pipeline(transaction=False)
                    for rkey in part:
                        pipe.execute_command("DEL", rkey)
                    self._announce(pipe, b"D", part)
                    return pipe.execute(raise_on_error=False)[: len(part)]

                replies = self._call(send)
                if replies is _DOWN:
                    break
                with self._lock:
                    for rkey, r in zip(part, replies):
                        if isinstance(r, int):
                            self._pending_deletes.pop(rkey, None)
                            done += 1
                if done < len(part):
                    break  # some failed: try later
            if done:
                self._save_pending_deletes()
        return done

    def iter_keys(self, spec: KVSpec, *, count: int = 1000):
        """Block hashes of ``spec`` present in Redis (``SCAN`` over every primary); stops early if Redis fails."""
        prefix = self.key_prefix(spec)
        client = self._call(lambda c: c)
        if client is _DOWN:
            return
        try:
            for rkey in client.scan_iter(match=prefix + b"*", count=count):
                try:
                    yield bytes.fromhex(rkey[len(prefix) :].decode())
                except ValueError:
                    continue  # a foreign key that happens to share the prefix
        except _BACKEND_ERRORS as e:
            self._failed(e)

    def close(self) -> None:
        if self._pending_deletes and not self._closed:
            try:
                self.retry_deletes()  # last chance: they are remembered in memory only
            except Exception:
                log.debug("redis tier %s: deletes not confirmed at close", self.name, exc_info=True)
        with self._client_lock:
            self._closed = True
            client, self._client = self._client, None
        if self._listener is not None:
            self._listener.join(timeout=3)
        if client is not None:
            try:
                client.close()
            except _BACKEND_ERRORS:
                pass

    # -- coherence across instances ----------------------------------------------------------
    def _announce(self, pipe, kind: bytes, rkeys: list[bytes]) -> None:
        """Queue an XADD of ``kind`` (S: written, D: deleted) for ``rkeys`` on ``pipe`` (its own call on a cluster)."""
        if not self.publish_invalidations or not rkeys:
            return
        fields = {b"m": kind + self.instance_id + b"\n".join(rkeys)}
        if self._cluster:  # one stream key, on one node: not part of a pipeline split by the blocks' keys
            try:
                self._get_client().xadd(INVALIDATION_STREAM, fields, maxlen=INVALIDATION_STREAM_LEN, approximate=True)
            except _BACKEND_ERRORS as e:
                self._failed(e)
        else:
            pipe.xadd(INVALIDATION_STREAM, fields, maxlen=INVALIDATION_STREAM_LEN, approximate=True)

    def listen_invalidations(self, handler: Callable[[list[bytes] | None, bool], None]) -> None:
        """Call ``handler(keys, deleted)`` (in a background thread) for blocks other instances wrote
        (``deleted`` False: maybe other bytes) or deleted in this Redis, as announced by their
        ``publish_invalidations``. Announcements are a capped Redis stream, read from where this
        instance left off, so a broken connection or a Redis restart loses none; only when the
        stream was trimmed past that point (this instance was away for more than
        ``INVALIDATION_STREAM_LEN`` announcements) is ``handler(None, False)`` called: some were
        missed. Own announcements are skipped."""
        if self._listener is not None:
            raise RuntimeError("listen_invalidations was called already")
        self._listener = threading.Thread(target=self._listen, args=(handler,), name=f"kvtier-{self.name}-invalidations", daemon=True)
        self._listener.start()

    def _listen(self, handler) -> None:
        last = None  # the id of the last announcement seen
        client = None
        while not self._closed:
            try:
                if client is None:
                    if self._cluster:
                        client = self._get_client()
                    else:
                        opts = {k: v for k, v in self._client_opts.items() if k in ("socket_connect_timeout", "ssl_ca_certs")}
                        client = redis.Redis.from_url(self._url, socket_timeout=5.0, **opts)
                    if last is None:  # from now on
                        info = client.xinfo_stream(INVALIDATION_STREAM) if client.exists(INVALIDATION_STREAM) else None
                        last = info["last-generated-id"] if info else b"0-0"
                    else:  # back after a break: were announcements trimmed before we read them?
                        first = client.xrange(INVALIDATION_STREAM, count=1)
                        if (
                            first
                            and _stream_id(first[0][0]) > _stream_id(last)
                            and client.xlen(INVALIDATION_STREAM) >= INVALIDATION_STREAM_LEN
                        ):
                            self.view.clear()  # what it says of other instances' blocks may be stale
                            handler(None, False)
                            self._reconcile_quietly()
                reply = client.xread({INVALIDATION_STREAM: last}, count=1000, block=1000)
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        last = entry_id
                        data = fields.get(b"m", b"")
                        if len(data) < 9 or data[1:9] == self.instance_id or data[:1] not in (b"S", b"D"):
                            continue
                        rkeys = data[9:].split(b"\n")
                        self.view.note(rkeys, data[:1] == b"S", until=self._seen_until())
                        keys = []
                        for rkey in rkeys:
                            try:
                                keys.append(bytes.fromhex(rkey.rsplit(b":", 1)[-1].decode()))
                            except ValueError:
                                continue
                        handler([k for k in keys if len(k) == 32], data[:1] == b"D")
            except _BACKEND_ERRORS:
                if client is not None and not self._cluster:
                    try:
                        client.close()
                    except Exception:
                        pass
                client = None
                time.sleep(max(0.1, self.retry_interval_s))
                if not self._closed:
                    self._reconcile_quietly()  # Redis may have restarted empty
            except Exception:  # the handler failed: a bug, logged; listening goes on
                log.exception("redis tier %s: invalidation handler failed", self.name)
                time.sleep(0.1)
        if client is not None and not self._cluster:
            try:
                client.close()
            except Exception:
                pass

    # -- accounting ------------------------------------------------------------------------
    def _reserve(self, rkey: bytes, nbytes: int) -> int | None:
        """Count ``nbytes`` for ``rkey`` before writing it; the bytes added, or None if it does not fit."""
        with self._lock:
            old = self._sizes.get(rkey)
            delta = nbytes - (old[0] if old else 0)
            if not self._fits(delta):
                self._prune_expired()
                old = self._sizes.get(rkey)
                delta = nbytes - (old[0] if old else 0)
                if not self._fits(delta):
                    self._stats.refused += 1
                    return None
            self._stats.bytes += delta
            return delta

    def _settle_puts(self, batch: list[int], replies: list, reserved: dict, sizes: list[int]) -> None:
        expiry = None if self.ttl_s is None else time.monotonic() + self.ttl_s
        with self._lock:
            for i, reply in zip(batch, replies):
                rkey, nbytes, delta = reserved.pop(i)
                if reply is not True:
                    self._stats.bytes -= delta
                    if isinstance(reply, OutOfMemoryError):
                        self._stats.refused += 1  # Redis' maxmemory with noeviction: no room, not a fault
                    continue
                if rkey not in self._sizes:
                    self._stats.blocks += 1
                self._sizes[rkey] = (nbytes, expiry)
                self.view.note([rkey], True, until=math.inf if expiry is None else expiry)
                self._stats.puts += 1
                sizes[i] = nbytes
        self._check_replies(replies, ignore=OutOfMemoryError)

    def _forget(self, rkey: bytes) -> None:  # under self._lock: gone from Redis (deleted, expired, missing)
        self.view.note([rkey], False)
        self._data_offset.pop(rkey, None)
        entry = self._sizes.pop(rkey, None)
        if entry is not None:
            self._stats.bytes -= entry[0]
            self._stats.blocks -= 1

    def _prune_expired(self) -> None:  # under self._lock
        now = time.monotonic()
        for rkey in [k for k, (_, exp) in self._sizes.items() if exp is not None and exp <= now]:
            self._forget(rkey)

    # -- Redis -----------------------------------------------------------------------------
    def _delete(self, rkeys: list[bytes]) -> int:
        def send(client):
            pipe = client.pipeline(transaction=False)
            for rkey in rkeys:
                pipe.execute_command("DEL", rkey)
            self._announce(pipe, b"D", rkeys)
            return pipe.execute(raise_on_error=False)[: len(rkeys)]

        replies = self._call(send)
        if replies is _DOWN:
            self._remember_deletes(rkeys)
            return 0
        n = 0
        unconfirmed = []
        with self._lock:
            for rkey, r in zip(rkeys, replies):
                if isinstance(r, int):
                    self._forget(rkey)
                    n += r == 1
                else:  # an error in its place (e.g. CLUSTERDOWN on that node): not deleted
                    unconfirmed.append(rkey)
            self._stats.removed += n
        if unconfirmed:
            self._remember_deletes(unconfirmed)
        self._check_replies(replies)
        return n

    @staticmethod
    def _pipelined(client, command: str, rkeys: list[bytes]) -> list:
        pipe = client.pipeline(transaction=False)
        for rkey in rkeys:
            pipe.execute_command(command, rkey)
        return pipe.execute(raise_on_error=False)

    def _check_replies(self, replies: list, ignore: type | tuple = ()) -> None:
        """A pipeline answered, but some commands failed (e.g. CLUSTERDOWN): count it as a fault."""
        for r in replies:
            if isinstance(r, Exception) and not isinstance(r, ignore) and not _is_foreign(r):
                self._failed(r)
                return

    def _codec_named(self, name: str) -> Codec:
        codec = self._codecs.get(name)
        if codec is None:
            codec = self._codecs[name] = get_codec(name)  # ValueError for a codec we do not know
        return codec

    def _get_client(self):
        with self._client_lock:
            if self._closed:
                raise RuntimeError(f"redis tier {self.name} is closed")
            if self._client is None:
                if self._cluster:  # discovers the nodes now: may raise, and is tried again later
                    self._client = RedisCluster.from_url(self._url, retry=_no_retry(), **self._client_opts)
                else:
                    opts = dict(self._client_opts)
                    pool_class = opts.pop("connection_pool_class")
                    self._client = redis.Redis(connection_pool=pool_class.from_url(self._url, **opts))
            return self._client

    # -- faults ----------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False while the circuit is open after a failure (calls would degrade without trying);
        the store waits for this before writing refused write-throughs again."""
        return not self._closed and time.monotonic() >= self._down_until

    @property
    def failing(self) -> bool:
        """True from a failed call until a call succeeds (Redis is down or failing as far as known)."""
        return self._failing

    def _circuit_open(self) -> bool:
        """True (and the call counted as degraded) while the circuit is open after a failure."""
        if time.monotonic() >= self._down_until:
            return False
        with self._lock:
            self._stats.errors += 1
            self._degraded_since_warn += 1
        return True

    def _call(self, fn: Callable[[Any], T]) -> T | _Down:
        """``fn(client)``, or ``_DOWN`` if the circuit is open or Redis fails."""
        if self._closed:
            raise RuntimeError(f"redis tier {self.name} is closed")
        if self._circuit_open():
            return _DOWN
        try:
            result = fn(self._get_client())
        except _BACKEND_ERRORS as e:
            self._failed(e)
            return _DOWN
        if self._failing:
            self._recovered()
        return result

    def _failed(self, error: BaseException) -> None:
        """Count a fault, open the circuit, and warn — at most once per ``_WARN_EVERY_S``."""
        now = time.monotonic()
        with self._lock:
            self._stats.errors += 1
            self._down_until = now + self.retry_interval_s
            self._failing = True
            if now - self._last_warn < _WARN_EVERY_S:
                self._degraded_since_warn += 1
                return
            degraded, self._degraded_since_warn = self._degraded_since_warn, 0
            self._last_warn, self._announced = now, True
        log.warning(
            "redis tier %s: Redis at %s is unreachable or failing (%s: %s); calls degrade to misses and "
            "retry every %.1fs (%d call(s) degraded before this message)",
            self.name,
            self._where,
            type(error).__name__,
            error,
            self.retry_interval_s,
            degraded,
        )

    def reconcile(self, batch: int = 1000) -> int:
        """Forget the blocks this instance counts but Redis no longer holds (restarted empty,
        flushed, evicted); returns how many. Runs by itself after Redis comes back from a fault."""
        with self._lock:
            tracked = list(self._sizes.items())
        gone = 0
        for i in range(0, len(tracked), batch):
            part = tracked[i : i + batch]
            replies = self._call(lambda c: self._pipelined(c, "EXISTS", [k for k, _ in part]))
            if replies is _DOWN:
                return gone
            with self._lock:
                for (rkey, entry), r in zip(part, replies):
                    if r == 0 and self._sizes.get(rkey) == entry:  # unchanged since the snapshot
                        self._forget(rkey)
                        gone += 1
        if gone:
            log.warning("redis tier %s: %d block(s) this instance wrote are no longer in Redis (restarted or flushed)", self.name, gone)
        return gone

    def _recovered(self) -> None:
        with self._lock:
            if not self._failing:
                return
            self._failing = False
            if not self._closed:  # Redis may have come back empty: check the accounting, off the caller's path
                threading.Thread(target=self._reconcile_quietly, name=f"kvtier-{self.name}-reconcile", daemon=True).start()
            if not self._announced:  # a flap inside the warning interval: stay quiet
                return
            self._announced = False
            degraded, self._degraded_since_warn = self._degraded_since_warn, 0
        log.warning("redis tier %s: Redis at %s is reachable again (%d call(s) degraded meanwhile)", self.name, self._where, degraded)

    def _reconcile_quietly(self) -> None:
        try:
            self.retry_deletes()
            self.reconcile()
        except Exception:  # closed meanwhile, or a bug: the accounting stays approximate
            log.debug("redis tier %s: reconcile failed", self.name, exc_info=True)


def _stream_id(entry_id) -> tuple[int, int]:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)).partition("-")
    return int(ms), int(seq or 0)


def _is_foreign(reply) -> bool:
    """True for the error that says a key holds a value of another type (not a frame of ours)."""
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


def _no_retry():
    # Retrying inside redis-py would multiply the socket timeouts; the circuit retries instead.
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


def _parse_url(url: str) -> tuple[bool, bool, str]:
    """(tls, cluster, the url redis-py understands) or ValueError."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"url must look like redis://host:port/db, got {url!r}")
    split = urlsplit(url)
    scheme = split.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"url scheme must be one of {sorted(_SCHEMES)}, got {scheme!r}")
    try:
        _ = split.port  # parsing it raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"url has an invalid port: {url!r}") from None
    if not split.hostname:
        raise ValueError(f"url needs a host: {url!r}")
    tls, cluster = _SCHEMES[scheme]
    if cluster:
        if split.path not in ("", "/", "/0"):
            raise ValueError(f"a Redis Cluster has only database 0, got path {split.path!r} in {url!r}")
        # redis-py's cluster client takes redis:// or rediss://; TLS is chosen by our connection class
        return tls, cluster, urlunsplit(("redis", split.netloc, "", split.query, ""))
    return tls, cluster, url


def _check_number(name: str, value, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (positive and value == 0):
        want = "a positive" if positive else "a non-negative"
        raise ValueError(f"{name} must be {want} finite number, got {value!r}")
