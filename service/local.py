"""The same-host transport: a Unix socket for control, a shared-memory segment for the bytes.

An engine on the same machine as kvtier (the usual sidecar) need not push megabytes through TCP
and HTTP: it writes its frames into memory the server maps too, and the server writes the frames
it answers into the same memory. Only small msgpack messages cross the socket.

Connection, in order:

1. the client connects to ``settings.local_socket`` and sends ``hello {api_key, segment_bytes}``;
2. the server authenticates the key (the same ``Authenticator`` as REST and gRPC: the connection
   then acts as that tenant), creates an anonymous ``memfd`` of ``segment_bytes`` (at most
   ``max_local_segment_bytes``), seals its size (``F_SEAL_SHRINK | F_SEAL_GROW``: a client cannot
   truncate it under the server), and passes the descriptor back (``SCM_RIGHTS``); both map it;
3. requests follow, one at a time per connection: ``{op, args, len}`` where ``len`` bytes at the
   start of the segment are the request's frames (a put) or where the answer's frames go (a get).

Every request goes through ``KVService`` exactly as a REST request does: the same validation,
tenancy, quotas, limits (``max_blocks_per_request``, ...) and frame checksums (a put's frames are
msgpack ``bin`` items in the REST body layout and are verified one by one; a get's answer is
frames the client verifies). A client that writes the segment while the server reads it can
only spoil its own tenant's blocks, which it could do with any transport.

No segment outlives its connection: a memfd has no name (nothing in ``/dev/shm`` to leak), and its
memory goes when both sides have closed it. When a client dies, its socket closes, the server's
connection thread sees EOF and closes its mapping and descriptor. Wire format of a message: a
4-byte little-endian length, then one msgpack map; an answer is ``{ok: result}`` or ``{error:
{status, code, message, field}}``.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import torch

from . import wire
from .errors import BadRequest, PayloadTooLarge, ServiceError, Unauthorized
from .limits import MAX_NAMESPACE_CHARS

log = logging.getLogger("kvtier.local")

_LEN = struct.Struct("<I")
MAX_CONTROL_BYTES = 16 << 20  # a control message larger than this is not ours
# a get answer puts each frame's payload at a 64-byte aligned offset (typed views need aligned data),
# with room before it for the frame's header and its msgpack bin32 item header
_ALIGN = 64


# -- framing of control messages (both sides) -----------------------------------------------
def send_msg(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    msg = _LEN.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [msg], fds)
    else:
        sock.sendall(msg)


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view, pos = memoryview(buf), 0
    while pos < n:
        got = sock.recv_into(view[pos:], n - pos)
        if got == 0:
            return None
        pos += got
    return bytes(buf)


def recv_msg(sock: socket.socket, limit: int = MAX_CONTROL_BYTES, *, with_fds: bool = False):
    """One message (None: the peer closed). ``with_fds``: (message, fds) from the first bytes' ancillary data."""
    fds: list[int] = []
    if with_fds:
        head, fds, _, _ = socket.recv_fds(sock, _LEN.size, 1)
        if len(head) < _LEN.size:
            rest = recv_exact(sock, _LEN.size - len(head)) if head else None
            if rest is None:
                return (None, fds)
            head += rest
    else:
        got = recv_exact(sock, _LEN.size)
        if got is None:
            return None
        head = got
    (n,) = _LEN.unpack(head)
    if n > limit:
        raise ValueError(f"a control message of {n} bytes, at most {limit} are allowed")
    data = recv_exact(sock, n)
    msg = None if data is None else msgpack.unpackb(data, raw=False, strict_map_key=False)
    return (msg, fds) if with_fds else msg


def make_segment(nbytes: int) -> int:
    """An anonymous shared-memory file of ``nbytes``, sealed against shrinking and growing."""
    fd = os.memfd_create("kvtier-local", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def frame_slot_bytes(spec) -> int:
    """Segment bytes one block takes in a get answer (header room + payload, aligned)."""
    return _align(header_room(spec) + spec.block_nbytes)


def header_room(spec) -> int:
    """Room before a payload for its frame header and item header: the header of a zero key with
    the largest checksum, plus the 5-byte bin32 item header, aligned."""
    head, _ = _max_header(spec)
    return _align(len(head) + 5 + 16)


def _max_header(spec):
    from kvtier.kvstore.frames import encode_frame_parts

    return encode_frame_parts(b"\xff" * 32, spec, "identity", {}, spec.block_shape, spec.dtype, b"")


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# -- the server -----------------------------------------------------------------------------
class LocalServer:
    """Serves ``KVService`` on a Unix socket, one thread per connection (at most ``max_local_clients``)."""

    def __init__(self, svc, settings, auth) -> None:
        self.svc, self.settings, self.auth = svc, settings, auth
        self.path = Path(settings.local_socket)
        self.max_clients = settings.max_local_clients
        self.max_segment = int(settings.max_local_segment_bytes)
        self._transfers = threading.BoundedSemaphore(settings.max_concurrent_transfers)
        self._lock = threading.Lock()
        self._conns: dict[int, socket.socket] = {}
        self._ids = 0
        self._stopping = threading.Event()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket() or self.path.exists():
            self._unlink_stale()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177)  # the socket file is created 0600: no moment where another user may connect
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(umask)
        os.chmod(self.path, 0o600)  # the API key is the authority; the file mode keeps other users out too
        self._uid = os.geteuid()
        self._sock.listen(128)
        self._thread = threading.Thread(target=self._accept_loop, name="kvtier-local-accept", daemon=True)
        self._thread.start()
        log.info("local transport on unix://%s", self.path)

    def _unlink_stale(self) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink(missing_ok=True)  # nobody listens: left by a process that died
            return
        finally:
            probe.close()
        raise RuntimeError(f"another process serves {self.path} already")

    @property
    def num_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if len(self._conns) >= self.max_clients:
                    full = True
                else:
                    full = False
                    self._ids += 1
                    cid = self._ids
                    self._conns[cid] = conn
            if full:
                try:
                    send_msg(
                        conn,
                        {
                            "error": {
                                "status": 503,
                                "code": "busy",
                                "field": None,
                                "message": f"{self.max_clients} local clients are connected (max_local_clients)",
                            }
                        },
                    )
                finally:
                    conn.close()
                continue
            threading.Thread(target=self._serve, args=(cid, conn), name=f"kvtier-local-{cid}", daemon=True).start()

    def _peer_allowed(self, conn: socket.socket) -> bool:
        """SO_PEERCRED: the connecting process runs as this server's user or as root. (The file mode
        already keeps other users out; this also holds if the mode or a directory above is loosened.)"""
        try:
            _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        except OSError:
            return False
        return uid in (self._uid, 0)

    def _serve(self, cid: int, conn: socket.socket) -> None:
        seg = fd = None
        try:
            if not self._peer_allowed(conn):
                log.warning("local transport: refused a connection from another user (SO_PEERCRED)")
                send_msg(conn, {"error": {"status": 403, "code": "forbidden", "field": None, "message": "another user's process"}})
                return
            hello = recv_msg(conn, 1 << 16)
            if not isinstance(hello, dict) or hello.get("op") != "hello":
                return
            try:
                principal, nbytes = self._hello(hello)
            except ServiceError as e:
                send_msg(conn, {"error": e.to_dict()["error"] | {"status": e.status}})
                return
            fd = make_segment(nbytes)
            seg = mmap.mmap(fd, nbytes)
            send_msg(conn, {"ok": {"segment_bytes": nbytes, "tenant": principal.tenant}}, fds=[fd])
            os.close(fd)  # the mapping keeps the memory; the client holds its own descriptor
            fd = None
            while not self._stopping.is_set():
                req = recv_msg(conn, min(MAX_CONTROL_BYTES, int(self.settings.max_json_bytes)))
                if req is None:
                    return  # the client closed (or died)
                t0 = time.perf_counter()
                op = req.get("op") if isinstance(req, dict) else None
                try:
                    answer = {"ok": self._dispatch(principal, seg, req)}
                    status = 200
                except ServiceError as e:
                    answer = {"error": e.to_dict()["error"] | {"status": e.status}}
                    status = e.status
                except Exception:  # a bug: logged, answered as 500, the connection goes on
                    log.exception("local transport: %s failed", op)
                    answer = {"error": {"status": 500, "code": "internal", "message": "internal error", "field": None}}
                    status = 500
                send_msg(conn, answer)
                if self.svc.metrics is not None:
                    self.svc.metrics.observe("local", str(op)[:32], status, time.perf_counter() - t0)
        except (OSError, ValueError, msgpack.UnpackException) as e:
            log.debug("local connection %d ends: %s", cid, e)
        finally:
            if seg is not None:
                try:
                    seg.close()
                except BufferError:  # a view of it still alive somewhere: the mapping goes with it
                    pass
            if fd is not None:
                os.close(fd)
            conn.close()
            with self._lock:
                self._conns.pop(cid, None)

    def _hello(self, hello: dict):
        key = hello.get("api_key")
        if key is not None and not isinstance(key, str):
            raise Unauthorized("api_key must be a string", field="api_key")
        principal = self.auth.authenticate(f"Bearer {key}" if key else None, None)
        nbytes = hello.get("segment_bytes")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 4096 <= nbytes <= self.max_segment:
            raise BadRequest(
                f"segment_bytes must be an integer in [4096, {self.max_segment}] (max_local_segment_bytes), got {nbytes!r}"[:200],
                field="segment_bytes",
            )
        return principal, nbytes

    def _dispatch(self, p, seg: mmap.mmap, req: dict):
        svc = self.svc
        svc.admit(p)  # the tenant's request rate (tenant_requests_per_s), as on REST and gRPC: 429 beyond it
        op, args = req.get("op"), req.get("args")
        if not isinstance(args, dict):
            raise BadRequest("args must be a map", field="args")
        n = req.get("len", 0)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(seg):
            raise BadRequest(f"len must be an integer in [0, {len(seg)}] (the segment)", field="len")
        if op == "lookup":
            return svc.lookup(
                p,
                _str(args, "model"),
                token_ids=args.get("token_ids"),
                hashes=args.get("hashes"),
                salt=args.get("salt", ""),
                extra_keys=args.get("extra_keys", []),
                return_keys=bool(args.get("return_keys", False)),
            )
        if op == "put":
            with self._transfers:
                items = wire.split_items(memoryview(seg)[:n], max_items=self.settings.max_blocks_per_request)
                stored = svc.put_frames(p, _str(args, "model"), items, args.get("parent"))
            return {"stored": stored, "num_stored": sum(stored)}
        if op == "get":
            return self._get(p, seg, args)
        if op == "delete":
            return {"removed": svc.delete(p, _str(args, "model"), args.get("keys"))}
        if op == "pin":
            info = svc.pin(p, _str(args, "model"), args.get("keys"), args.get("ttl_s"))
            return {"lease_id": info.id, "ttl_s": args.get("ttl_s"), "num_pinned": info.num_pinned}
        if op == "unpin":
            lease_id = args.get("lease_id")
            if isinstance(lease_id, bool) or not isinstance(lease_id, int):
                raise BadRequest("lease_id must be an integer", field="lease_id")
            svc.unpin(p, lease_id)
            return {"unpinned": True}
        if op == "register_spec":
            model, spec = svc.register_spec(p, args.get("spec"))
            return {"model": model, "spec": spec.to_dict()}
        if op == "specs":
            return {m: s.to_dict() for m, s in svc.registry.models_of(p.tenant).items()}
        if op == "stats":
            return svc.stats(p)
        if op == "events":
            return svc.events(p, args.get("after", 0), args.get("limit", 1000))
        if op in ("retrieve", "attention"):
            extra = set(args) - _QUERY_FIELDS
            if extra:
                raise BadRequest(f"unknown field {sorted(extra)[0][:64]!r}", field=sorted(extra)[0][:64])
            fields = {k: v for k, v in args.items() if k not in ("model", "q")}
            run = svc.retrieve if op == "retrieve" else svc.attention
            with self._transfers:  # they read blocks: bounded like the block transfers
                out = run(p, _str(args, "model"), q=args.get("q"), **fields)
            return {k: wire.tensor_to_wire(v) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        raise BadRequest(f"unknown op {str(op)[:64]!r}", field="op")

    def _get(self, p, seg: mmap.mmap, args: dict) -> dict:
        """Blocks written straight into the segment (the tiers copy into typed views of it), each
        preceded by its frame header: the answer names each item's (offset, length), or nil."""

        svc = self.svc
        spec = svc.spec_of(p, _str(args, "model"))
        ckeys = svc._client_keys(args.get("keys"), "keys")
        room, slot = header_room(spec), frame_slot_bytes(spec)
        if slot * len(ckeys) > len(seg):
            raise PayloadTooLarge(f"{len(ckeys)} blocks need {slot * len(ckeys)} bytes of the segment, it has {len(seg)}", field="keys")
        base = torch.frombuffer(seg, dtype=torch.uint8)  # shares the mapping
        out = [
            base[i * slot + room : i * slot + room + spec.block_nbytes].view(spec.torch_dtype).view(spec.block_shape)
            for i in range(len(ckeys))
        ]
        with self._transfers:
            blocks = svc.get_checked(p, spec, ckeys, out=out)
        del base
        items: list[list[int] | None] = []  # per key: [offset, length] of its frame in the segment, or None (a miss)
        for i, (k, b) in enumerate(zip(ckeys, blocks)):
            if b is None:
                items.append(None)
                continue
            start = i * slot + room
            if b.data_ptr() != out[i].data_ptr():  # a tier that could not write into the buffer
                out[i].copy_(b)
            head, _ = svc.encode_block_parts(spec, k, out[i])
            at = start - len(head)
            seg[at:start] = head
            items.append([at, len(head) + spec.block_nbytes])
        return {"items": items}


_QUERY_FIELDS = {"model", "q", "budget", "token_ids", "hashes", "salt", "extra_keys", "layers"}


def _str(args: dict, name: str) -> str:
    v = args.get(name)
    if not isinstance(v, str) or len(v) > MAX_NAMESPACE_CHARS:
        raise BadRequest(f"{name} must be a string", field=name)
    return v


def close_server(server: LocalServer) -> None:
    server._stopping.set()
    try:
        server._sock.close()
    finally:
        server.path.unlink(missing_ok=True)
    with server._lock:
        conns = list(server._conns.values())
    for c in conns:
        try:
            c.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
