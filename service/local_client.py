"""``LocalKVTierClient``: the SDK over the same-host transport (``service.local``).

``KVTierClient("unix:///run/kvtier.sock", api_key=...)`` returns one of these: the same methods,
answers and errors as over REST, with block bytes moved through a shared-memory segment instead
of a socket. A put is streamed (``stream_puts``, the default): the client copies each block into the
segment a part at a time (``stream_part_bytes``) and says so after each part, while the server
copies and verifies the parts already written into the buffers its host tier keeps; the blocks'
checksums go with the last message. ``stream_puts=False`` writes the whole request first, as frames
(the server then verifies them and its tier copies them). A get has the server's tier copy each
block into the segment and the client copy it out once (into ``out`` when given), after verifying
its frame.

CUDA tensors (a put's blocks, a get's ``out`` buffers) travel as CUDA IPC handles instead, when the
server has CUDA (``service.cuda_ipc``; ``cuda_ipc=False`` turns this off).

Each connection owns one segment and carries one request at a time; a client keeps a small pool
(one per thread using it at once). A request larger than the segment is split (a put's later
parts name the previous part's last key as their parent, so the chain stays one chain).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import threading
import time
from typing import Any, Sequence

import msgpack
import torch
import xxhash

from kvtier.kvstore import KVSpec
from kvtier.kvstore.codecs.base import tensor_bytes

from . import cuda_ipc as ipc
from . import wire
from .client import (
    KVTierClient,
    KVTierError,
    Lookup,
    _Base,
    _key_hex,
    _parse_attention,
    _parse_lookup,
    _parse_retrieval,
    _query_body,
    _spec_body,
    block_list,
    decode_items,
    encode_frame_list,
)
from .local import _LEN, MAX_CONTROL_BYTES, _align, frame_slot_bytes, recv_msg, send_msg

DEFAULT_SEGMENT_BYTES = 64 << 20
_CUDA_PER_REQUEST = 32  # blocks per put_cuda / get_cuda request (the server's max_blocks_per_request is 64 by default)
# puts that fit half the segment are written one after the other in a ring with room for this many of them
_RING_PUTS = 6
# a streamed put tells the server after each part of this many bytes (docs/data-path.md: 0.5-1 MiB parts
# overlapped best on the CPU box; smaller ones cost more messages than they save)
STREAM_PART_BYTES = 1 << 20


class _Conn:
    def __init__(self, sock: socket.socket, seg: mmap.mmap) -> None:
        self.sock, self.seg = sock, seg
        self.cursor = 0  # where the next put that fits half the segment is written (puts go one after the other)

    def ring_offset(self, size: int) -> int | None:
        """Where a put of ``size`` bytes goes: right after the previous one, wrapping around, in a ring with
        room for ``_RING_PUTS`` such puts (at most the segment: more than the server's pending summaries, at
        most 4, and no more segment memory touched than that); None when it does not fit half the segment.
        The server may still read earlier puts' bytes (their page summaries) after their answers; a put written
        over such bytes only costs those summaries (the server drops and later remakes them)."""
        if size > len(self.seg) // 2:
            return None
        pos = self.cursor if self.cursor + size <= min(len(self.seg), _RING_PUTS * _align(size)) else 0
        self.cursor = _align(pos + size)
        return pos

    def close(self) -> None:
        try:
            self.seg.close()
        except BufferError:
            pass
        self.sock.close()


class LocalKVTierClient(KVTierClient):
    """Synchronous client of the local transport (``unix://PATH``). See the module docstring."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        cuda_ipc: bool = True,
        stream_puts: bool = True,
        stream_part_bytes: int = STREAM_PART_BYTES,
    ) -> None:
        _Base.__init__(self, base_url, api_key, timeout, retries, backoff_s)
        if not base_url.startswith("unix://") or len(base_url) <= len("unix://"):
            raise ValueError(f"a local URL is unix://PATH, got {base_url!r}")
        self.path = base_url[len("unix://") :]
        self.timeout = timeout
        self.segment_bytes = int(segment_bytes)
        self._api_key = api_key
        self._idle: list[_Conn] = []
        self._pool_lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False  # connections open at the first call (as over REST: a client never fails to be made)
        self._server_cuda_ipc: bool | None = None  # the server maps CUDA IPC handles (its hello answer says)
        self._server_put_stream: bool | None = None  # the server takes streamed puts (its hello answer says)
        self.cuda_ipc = cuda_ipc
        self.stream_puts = stream_puts
        if isinstance(stream_part_bytes, bool) or not isinstance(stream_part_bytes, int) or stream_part_bytes < 512:
            # the server takes parts of at least 512 bytes on average (service.local._MIN_PART)
            raise ValueError(f"stream_part_bytes must be an int >= 512, got {stream_part_bytes!r}")
        self.stream_part_bytes = stream_part_bytes

    # -- connections -----------------------------------------------------------------------
    def _connect(self) -> _Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: list[int] = []
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            send_msg(sock, {"op": "hello", "api_key": self._api_key, "segment_bytes": self.segment_bytes})
            msg, fds = recv_msg(sock, with_fds=True)
            if msg is None:
                raise ConnectionError(f"the local transport at {self.path} closed the connection")
            if "error" in msg:
                _raise(msg["error"])
            if len(fds) != 1:
                raise ConnectionError("the local transport sent no shared-memory segment")
            seg = mmap.mmap(fds[0], msg["ok"]["segment_bytes"])
            self._server_cuda_ipc = bool(msg["ok"].get("cuda_ipc", False))
            self._server_put_stream = bool(msg["ok"].get("put_stream", False))
            return _Conn(sock, seg)
        except BaseException:
            sock.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)  # the mapping holds the memory

    def _take(self) -> _Conn:
        with self._pool_lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            if self._pid != os.getpid():  # a forked child: the parent's connections are the parent's
                inherited, self._idle, self._pid = self._idle, [], os.getpid()
                for c in inherited:
                    c.close()  # this process's copies of the descriptors only: the parent's stay open
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _hello(self) -> None:
        """Connect once if no connection was made yet: the hello answer says what the server takes
        (``_server_cuda_ipc``, ``_server_put_stream``)."""
        if self._server_put_stream is None:
            self._release(self._take())

    def _release(self, conn: _Conn) -> None:
        with self._pool_lock:
            if not self._closed and len(self._idle) < 16:
                self._idle.append(conn)
                return
        conn.close()

    def _call(self, op: str, args: dict, fill=None, read=None, fill_conn: bool = False, stream=None):
        """One request. ``fill(seg) -> n`` writes the request's bytes into the segment; ``read(seg, result)``
        reads the answer's out of it (while the connection is still this call's). ``stream(conn)`` sends the
        request itself, then writes its bytes and sends its progress messages (a streamed put)."""
        for attempt in range(self.retries + 1):
            try:
                conn = self._take()
            except (ConnectionError, FileNotFoundError, socket.timeout) as e:
                if attempt == self.retries:
                    raise ConnectionError(f"the local transport at {self.path} is unreachable: {e}") from None
                time.sleep(self._delay(attempt))
                continue
            ok = False
            try:
                if stream is not None:
                    stream(conn)  # sends the request, then its parts
                else:
                    n = 0 if fill is None else fill(conn) if fill_conn else fill(conn.seg)
                    off = args.pop("off", 0)
                    send_msg(conn.sock, {"op": op, "args": args, "len": n, "off": off})
                msg = _recv_answer(conn.sock)
                if msg is None:
                    raise ConnectionError("the local transport closed the connection")
                ok = True
                if "error" in msg:
                    _raise(msg["error"])
                return read(conn.seg, msg["ok"]) if read is not None else msg["ok"]
            except (ConnectionError, BrokenPipeError, socket.timeout):
                if attempt == self.retries:
                    raise
            finally:
                if ok:
                    self._release(conn)
                else:
                    conn.close()
            time.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    # -- API -------------------------------------------------------------------------------
    def healthz(self) -> bool:
        self._call("specs", {})
        return True

    def ready(self) -> dict:
        return {"ready": True, "transport": "local"}

    def register_spec(self, spec: KVSpec) -> str:
        model = self._call("register_spec", {"spec": _spec_body(spec)})["model"]
        self._specs[model] = spec
        return model

    def unregister_spec(self, model: str) -> bool:
        """Withdraw this tenant's registration of ``model`` (404 unless it has one)."""
        self._specs.pop(model, None)
        return self._call("unregister_spec", {"model": model})["unregistered"]

    def spec(self, model: str) -> KVSpec:
        if model not in self._specs:
            specs = self._call("specs", {})
            if model not in specs:
                raise KVTierError(404, "not_found", f"model {model!r} is not registered for this tenant", "model")
            self._specs[model] = KVSpec.from_dict(specs[model])
        return self._specs[model]

    def lookup(
        self, model: str, *, token_ids=None, hashes=None, salt: str = "", extra_keys: Sequence[str] = (), return_keys: bool = False
    ) -> Lookup:
        args = {"model": model, "salt": salt, "extra_keys": list(extra_keys), "return_keys": return_keys}
        if token_ids is not None:
            args["token_ids"] = [int(t) for t in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids)]
        if hashes is not None:
            args["hashes"] = [h if isinstance(h, str) else bytes(h) for h in hashes]  # raw bytes: no hex either side
        return _parse_lookup(self._call("lookup", args))

    def _use_cuda_ipc(self, tensors) -> bool:
        """True when ``tensors`` are all CUDA tensors and the server maps CUDA IPC handles (and
        ``cuda_ipc`` was not turned off): they then travel as handles, not through the segment."""
        if not self.cuda_ipc:
            return False
        if isinstance(tensors, torch.Tensor):  # blocks stacked in one tensor: no per-block views to make
            if not tensors.is_cuda or not len(tensors):
                return False
        elif not tensors or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
            return False
        self._hello()
        return bool(self._server_cuda_ipc)

    def _cuda_call(self, op: str, model: str, keys: list[bytes], tensors: list[torch.Tensor], parent=None) -> list[dict]:
        """``put_cuda`` / ``get_cuda`` in requests of at most ``_CUDA_PER_REQUEST`` blocks (a put's
        later requests name the previous one's last key as their parent); the answers."""
        answers = []
        for d in {t.device for t in tensors}:
            torch.cuda.current_stream(d).synchronize()  # the blocks' last writes have landed
        for start in range(0, len(keys), _CUDA_PER_REQUEST):
            part, ts = keys[start : start + _CUDA_PER_REQUEST], tensors[start : start + _CUDA_PER_REQUEST]
            args: dict[str, Any] = {"model": model, "keys": [_key_hex(k) for k in part], "handles": [ipc.export(t) for t in ts]}
            if op == "put_cuda":
                args["parent"] = _key_hex(parent) if parent is not None else None
                parent = part[-1]
            answers.append(self._call(op, args))  # the tensors stay alive until answered: ``ts`` holds them
        return answers

    def put(self, model: str, keys: Sequence[bytes], blocks, *, parent: bytes | None = None) -> list[bool]:
        spec = self.spec(model)
        if not isinstance(blocks, torch.Tensor):
            blocks = list(blocks)  # read once: an iterator serves the check and the frames alike
        if self._use_cuda_ipc(blocks):
            if len(blocks) != len(keys):
                raise ValueError(f"put needs one block per key: got {len(keys)} keys and {len(blocks)} blocks")
            for i, b in enumerate(blocks):
                if tuple(b.shape) != tuple(spec.block_shape) or b.dtype != spec.torch_dtype:
                    raise ValueError(f"blocks[{i}] must be {spec.dtype} of shape {list(spec.block_shape)}, got {b.dtype} {list(b.shape)}")
            ks = [bytes.fromhex(k) if isinstance(k, str) else bytes(k) for k in keys]
            ts = [b.contiguous() for b in blocks]
            return [s for a in self._cuda_call("put_cuda", model, ks, ts, parent) for s in a["stored"]]
        if self.stream_puts:
            self._hello()
            if self._server_put_stream:
                return self._put_stream(spec, model, keys, blocks, parent)
        frames = encode_frame_list(spec, keys, blocks)
        keys = [bytes.fromhex(k) if isinstance(k, str) else bytes(k) for k in keys]
        stored: list[bool] = []
        start = 0
        while start < len(frames):
            end, size = start, 0
            while end < len(frames) and size + _item_bytes(frames[end]) <= self.segment_bytes:
                size += _item_bytes(frames[end])
                end += 1
            if end == start:
                raise ValueError(
                    f"a block's frame ({_item_bytes(frames[start])} bytes) is larger than the segment "
                    f"({self.segment_bytes} bytes): use a larger segment_bytes"
                )
            group = frames[start:end]
            args = {"model": model, "parent": _key_hex(parent) if parent is not None else None}

            def fill(conn, group=group, size=size, args=args):
                # a put that fits half the segment goes after the previous one ("alt", _Conn.ring_offset)
                pos = conn.ring_offset(size)
                if pos is None:
                    pos = 0
                else:
                    args["alt"], args["off"] = True, pos
                start_pos = pos
                for piece in wire.encode_parts(group):
                    n = len(piece) if isinstance(piece, bytes) else piece.nbytes
                    conn.seg[pos : pos + n] = piece
                    pos += n
                return pos - start_pos

            stored += self._call("put", args, fill=fill, fill_conn=True)["stored"]
            parent, start = keys[end - 1], end
        return stored

    def _put_stream(self, spec: KVSpec, model: str, keys: Sequence[bytes], blocks, parent) -> list[bool]:
        """A put as ``put_stream`` requests (``LocalServer._put_stream``): each block is copied into the
        segment a part at a time, and the server is told after each part, so it copies and verifies a part
        while the next one is written. Each block's XXH3-64 is computed here from the block's own bytes,
        a part at a time while it is in cache, and sent with the last message."""
        blocks = block_list(spec, keys, blocks)
        ks = [bytes.fromhex(k) if isinstance(k, str) else bytes(k) for k in keys]
        nb, part_bytes = spec.block_nbytes, self.stream_part_bytes
        if nb > self.segment_bytes:
            raise ValueError(f"a block ({nb} bytes) is larger than the segment ({self.segment_bytes} bytes): use a larger segment_bytes")
        per = self.segment_bytes // nb  # as the one-shot put: a larger request is refused as over REST (max_blocks_per_request)
        stored: list[bool] = []
        for start in range(0, len(ks), per):
            part = ks[start : start + per]
            srcs = [tensor_bytes(b.detach().cpu().contiguous()) for b in blocks[start : start + per]]
            total = nb * len(part)
            args = {"model": model, "keys": [_key_hex(k) for k in part], "parent": _key_hex(parent) if parent is not None else None}

            def stream(conn, srcs=srcs, total=total, args=args):
                seg = conn.seg
                # as a one-shot put's, in the ring: a server storing blocks from the segment itself (no host tier
                # first) may still read earlier puts' bytes for their page summaries
                start = conn.ring_offset(total) or 0
                send_msg(conn.sock, {"op": "put_stream", "args": args, "len": total, "off": start})
                sums, pos = [], start
                for src in srcs:
                    h = xxhash.xxh3_64()
                    cuts = list(range(0, nb, part_bytes)) + [nb]
                    for at, end in zip(cuts, cuts[1:]):
                        piece = src[at:end]
                        seg[pos + at : pos + end] = piece
                        h.update(piece)
                        if pos + end - start < total:
                            send_msg(conn.sock, {"ready": pos + end - start})
                    sums.append(h.intdigest())
                    pos += nb
                send_msg(conn.sock, {"ready": total, "checksums": sums})

            stored += self._call("put_stream", args, stream=stream)["stored"]
            parent = part[-1]
        return stored

    def get(self, model: str, keys: Sequence[bytes], out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        """Blocks ``[L, 2, H_kv, T, D]`` per key (None: a miss); with ``out``, copied into those buffers."""
        spec = self.spec(model)
        if out is not None and len(out) != len(keys):
            raise ValueError(f"get needs one out buffer per key: got {len(keys)} keys and {len(out)} buffers")
        if out is not None and self._use_cuda_ipc(out):  # the server copies into the CUDA buffers
            for i, o in enumerate(out):
                if tuple(o.shape) != tuple(spec.block_shape) or o.dtype != spec.torch_dtype or not o.is_contiguous():
                    raise ValueError(f"out[{i}] must be a contiguous {spec.dtype} tensor of shape {list(spec.block_shape)}")
            ks = [bytes.fromhex(k) if isinstance(k, str) else bytes(k) for k in keys]
            found = [f for a in self._cuda_call("get_cuda", model, ks, list(out)) for f in a["found"]]
            return [o if f else None for o, f in zip(out, found)]
        per_call = max(1, self.segment_bytes // frame_slot_bytes(spec))
        result: list[torch.Tensor | None] = []
        for start in range(0, len(keys), per_call):
            part = list(keys[start : start + per_call])
            part_out = out[start : start + per_call] if out is not None else None

            def read(seg, answer, part=part, part_out=part_out):
                view = memoryview(seg)
                try:
                    items = [None if it is None else view[it[0] : it[0] + it[1]] for it in answer["items"]]
                    return decode_items(spec, part, items, part_out)
                finally:
                    del items
                    view.release()

            result += self._call("get", {"model": model, "keys": [_key_hex(k) for k in part]}, read=read)
        return result

    def retrieve(
        self,
        model: str,
        q: torch.Tensor,
        budget: int,
        *,
        token_ids=None,
        hashes=None,
        salt: str = "",
        extra_keys: Sequence[str] = (),
        layers: Sequence[int] | None = None,
    ):
        return _parse_retrieval(self._call("retrieve", _query_body(model, q, budget, token_ids, hashes, salt, extra_keys, layers)))

    def attention(
        self,
        model: str,
        q: torch.Tensor,
        *,
        budget: int | None = None,
        token_ids=None,
        hashes=None,
        salt: str = "",
        extra_keys: Sequence[str] = (),
        layers: Sequence[int] | None = None,
    ):
        return _parse_attention(self._call("attention", _query_body(model, q, budget, token_ids, hashes, salt, extra_keys, layers)))

    def delete(self, model: str, keys: Sequence[bytes]) -> int:
        return self._call("delete", {"model": model, "keys": [_key_hex(k) for k in keys]})["removed"]

    def pin(self, model: str, keys: Sequence[bytes], ttl_s: float) -> dict:
        return self._call("pin", {"model": model, "keys": [_key_hex(k) for k in keys], "ttl_s": ttl_s})

    def unpin(self, lease_id: int) -> bool:
        return self._call("unpin", {"lease_id": int(lease_id)})["unpinned"]

    def stats(self) -> dict:
        return self._call("stats", {})

    def events(self, after: int = 0, limit: int = 1000) -> dict:
        return self._call("events", {"after": after, "limit": limit})


def _recv_answer(sock: socket.socket):
    """The answer to this connection's one request in flight (None: the server closed): usually one
    ``recv``. Nothing can follow it, so reading more than one message's bytes is never needed."""
    data = sock.recv(1 << 16)
    if not data:
        return None
    buf = bytearray(data) if len(data) < _LEN.size or len(data) != _LEN.size + _LEN.unpack_from(data)[0] else None
    if buf is None:
        return msgpack.unpackb(memoryview(data)[_LEN.size :], raw=False, strict_map_key=False)
    while len(buf) < _LEN.size:
        more = sock.recv(_LEN.size - len(buf))
        if not more:
            return None
        buf += more
    (n,) = _LEN.unpack_from(buf)
    if n > MAX_CONTROL_BYTES:
        raise ConnectionError(f"the local transport sent a message of {n} bytes, at most {MAX_CONTROL_BYTES} are allowed")
    while len(buf) < _LEN.size + n:
        more = sock.recv(min(1 << 20, _LEN.size + n - len(buf)))
        if not more:
            return None
        buf += more
    if len(buf) != _LEN.size + n:
        raise ConnectionError("the local transport sent bytes after its answer")
    return msgpack.unpackb(memoryview(buf)[_LEN.size :], raw=False, strict_map_key=False)


def _item_bytes(frame) -> int:
    head, payload = frame
    return 5 + len(head) + payload.nbytes


def _raise(err: dict):
    raise KVTierError(int(err.get("status", 400)), err.get("code", "error"), err.get("message", ""), err.get("field"))


class AsyncLocalKVTierClient:
    """``AsyncKVTierClient("unix://PATH", ...)``: the asyncio SDK over the same-host transport, with the
    same awaited methods, answers and errors as over REST. Each call runs ``LocalKVTierClient``'s on a
    worker thread (``asyncio.to_thread``): the event loop never waits on the socket or a copy, and calls
    awaited at the same time use connections of their own (the client's pool). Keyword arguments of
    ``LocalKVTierClient`` (``segment_bytes``, ``stream_puts``, ...) are passed on; ``max_connections``
    and ``verify`` (REST's) are accepted and unused."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        max_connections: int = 100,
        verify: bool | str = True,
        **local: Any,
    ) -> None:
        self.sync = LocalKVTierClient(base_url, api_key, timeout=timeout, retries=retries, backoff_s=backoff_s, **local)
        self.base_url = base_url

    async def aclose(self) -> None:
        self.sync.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


def _awaited(name: str):
    async def call(self, *args, **kwargs):
        return await asyncio.to_thread(getattr(self.sync, name), *args, **kwargs)

    call.__name__ = name
    call.__doc__ = f"``LocalKVTierClient.{name}`` on a worker thread, awaited."
    return call


for _name in (
    "healthz",
    "ready",
    "register_spec",
    "unregister_spec",
    "spec",
    "lookup",
    "hashes",
    "put",
    "get",
    "retrieve",
    "attention",
    "delete",
    "pin",
    "unpin",
    "stats",
    "events",
):
    setattr(AsyncLocalKVTierClient, _name, _awaited(_name))
del _name
