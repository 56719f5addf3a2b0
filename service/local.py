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
3. requests follow, one at a time per connection: ``{op, args, len, off}`` where ``len`` bytes at
   ``off`` in the segment are the request's frames (a put) or where the answer's frames go (a get,
   ``off`` 0). A put with ``args.alt`` lets the server read its bytes (for the page summaries)
   after it has answered. The client writes its next puts elsewhere in the segment (one after the
   other, wrapping around), so those reads go on alongside them; a later put written over bytes
   still being read makes the server drop what it made from them (recomputed when needed), and any
   other request waits for them. At most ``_MAX_AFTER`` puts per connection are read after their
   answers.

A streamed put (``put_stream``, what the SDK sends when the hello answer says ``put_stream: true``)
sends its request first and then its blocks a part at a time, each part announced by ``{ready: n}``
and the last message carrying the checksums: the server copies and verifies each part while the
client writes the next (``LocalServer._put_stream``; docs/data-path.md).

Blocks that are CUDA tensors may travel as CUDA IPC handles instead (``put_cuda``, ``get_cuda``;
``service.cuda_ipc``), when the hello answer says ``cuda_ipc: true``.

Every request goes through ``KVService`` exactly as a REST request does: the same validation,
tenancy, quotas, limits (``max_blocks_per_request``, ...) and frame checksums (a put's frames are
msgpack ``bin`` items in the REST body layout and are verified one by one; a get's answer is
frames the client verifies). A client that writes the segment while the server reads it can
only spoil its own tenant's blocks, which it could do with any transport.

No segment outlives its connection: a memfd has no name (nothing in ``/dev/shm`` to leak), and its
memory goes when both sides have closed it. When a client dies, its socket closes, the server
sees EOF and closes its mapping and descriptor. Wire format of a message: a
4-byte little-endian length, then one msgpack map; an answer is ``{ok: result}`` or ``{error:
{status, code, message, field}}``.
"""

from __future__ import annotations

import fcntl
import functools
import select
import selectors
import logging
import mmap
import os
import socket
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import torch

from . import cuda_ipc, wire
from .errors import BadRequest, PayloadTooLarge, ServiceError, Unauthorized

# .core (the server side: retrieval, faiss) is imported where the server needs it: a client process, such
# as a vLLM engine that reaches kvtier through local_client, imports this module for the framing only
from .limits import MAX_NAMESPACE_CHARS
from kvtier.threads import lower_thread_priority

_ADMITTED = object()  # marks a request already counted against its tenant's rate
# a streamed put may announce its bytes in parts as small as this on average (plus 64 messages)
_MIN_PART = 512
_READS_SEGMENT = object()  # marks a streamed put whose work after the answer reads the segment (no host tier first)

log = logging.getLogger("kvtier.local")

_LEN = struct.Struct("<I")
MAX_CONTROL_BYTES = 16 << 20  # a control message larger than this is not ours
# a get answer puts each frame's payload at a 64-byte aligned offset (typed views need aligned data),
# with room before it for the frame's header and its msgpack bin32 item header
_ALIGN = 64
# a worker that answered a request waits this long for the same client's next one before handing the
# connection back to the loop thread (back-to-back transfers then cost no thread hop)
_LINGER_S = 0.005
# at most this many puts of one connection may still have their page summaries read from the segment after
# their answers; one more drops the oldest if it has not started (its summaries are made when a query needs
# them) or waits for it: summaries never fall behind a client without bound, and never hold a put up for long
_MAX_AFTER = 4


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


@functools.lru_cache(maxsize=256)
def header_room(spec) -> int:
    """Room before a payload for its frame header and item header: the header of a zero key with
    the largest checksum, plus the 5-byte bin32 item header, aligned (computed once per spec)."""
    head, _ = _max_header(spec)
    return _align(len(head) + 5 + 16)


def _max_header(spec):
    from kvtier.kvstore.frames import encode_frame_parts

    return encode_frame_parts(b"\xff" * 32, spec, "identity", {}, spec.block_shape, spec.dtype, b"")


def _lower_priority(nice: int, io_priority: str = "normal") -> None:
    """The bulk and "after" pools' initializer: their threads run ``nice`` lower in CPU priority, at
    I/O priority ``io_priority`` (a put's demotions to the disk tier are written from these threads)."""
    lower_thread_priority(nice, "local transport: bulk threads", io_priority)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# -- the server -----------------------------------------------------------------------------
class _Peer:
    """One client connection: its socket, segment and tenant, and bytes read but not yet handled.
    Owned by the server's loop thread, or by one worker while a request of it is handed off."""

    __slots__ = ("cid", "sock", "seg", "principal", "inbuf", "after")

    def __init__(self, cid: int, sock: socket.socket) -> None:
        self.cid, self.sock = cid, sock
        self.seg: mmap.mmap | None = None
        self.principal = None
        self.inbuf = bytearray()
        # work after this connection's answers that still reads its segment (puts' page summaries), running
        # on the server's "after" threads, oldest first, at most _MAX_AFTER: (the work, what undoes it if the
        # segment was spoiled under it, the first byte it reads, the byte after the last)
        self.after: deque[tuple[Future, list, int, int]] = deque()


class LocalServer:
    """Serves ``KVService`` on a Unix socket (at most ``max_local_clients`` connections).

    One loop thread waits on every connection at once (``selectors``) and reads their requests.
    It answers lookups itself when the store has no shared tier (an index read: no I/O, and the
    store's lock only tried, never waited for); everything else (put, get, and a lookup that
    would wait) runs on a worker thread, one request per connection at a time, and the connection
    comes back to the loop when it is answered. With a thread per connection instead, 64 clients
    meant 64 threads contending for the GIL for every small request (docs/data-path.md).
    """

    def __init__(self, svc, settings, auth) -> None:
        self.svc, self.settings, self.auth = svc, settings, auth
        self.path = Path(settings.local_socket)
        self.max_clients = settings.max_local_clients
        self.max_segment = int(settings.max_local_segment_bytes)
        self._control_limit = min(MAX_CONTROL_BYTES, int(settings.max_json_bytes))
        self._transfers = threading.BoundedSemaphore(settings.max_concurrent_transfers)
        self._lock = threading.Lock()
        self._conns: dict[int, _Peer] = {}
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
        self._sock.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._returned: deque[tuple[_Peer, bool]] = deque()  # (peer, keep it) handed back by workers
        self._workers = ThreadPoolExecutor(self.max_clients, thread_name_prefix="kvtier-local")
        # puts (block bytes in, demotions to slower tiers) run on threads of their own at a lower CPU
        # priority: on a busy machine, gets and lookups are not slowed down by a client filling the store
        self._bulk = ThreadPoolExecutor(
            max(1, settings.max_concurrent_transfers),
            thread_name_prefix="kvtier-local-bulk",
            initializer=_lower_priority,
            initargs=(settings.local_bulk_nice, settings.local_bulk_io_priority),
        )
        # work after an answer (a put's page summaries) runs here, overlapping the same client's next puts
        self._after = ThreadPoolExecutor(
            max(1, settings.max_concurrent_transfers),
            thread_name_prefix="kvtier-local-after",
            initializer=_lower_priority,
            initargs=(max(settings.local_bulk_nice, settings.local_summary_nice), settings.local_bulk_io_priority),
        )
        self._sel.register(self._sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name="kvtier-local-loop", daemon=True)
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

    # -- the loop thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, _ in self._sel.select(timeout=1.0):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        self._readable(key.data)
                while self._returned:
                    peer, keep = self._returned.popleft()
                    if keep and not self._stopping.is_set():
                        self._sel.register(peer.sock, selectors.EVENT_READ, peer)
                        self._handle_buffered(peer)
                    else:
                        self._drop(peer, registered=False)
        except Exception:  # a bug: the transport stops, logged
            log.exception("local transport loop failed")
        finally:
            self._sel.close()
            self._sock.close()
            with self._lock:
                peers = list(self._conns.values())
            for peer in peers:
                try:
                    peer.sock.shutdown(socket.SHUT_RDWR)  # ends a worker's wait on it too
                except OSError:
                    pass

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError:
                return  # closed
            with self._lock:
                full = len(self._conns) >= self.max_clients
                if not full:
                    self._ids += 1
                    peer = _Peer(self._ids, conn)
                    self._conns[peer.cid] = peer
            if full:
                try:
                    conn.settimeout(1.0)
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
                except OSError:
                    pass
                finally:
                    conn.close()
                continue
            if not self._peer_allowed(conn):
                log.warning("local transport: refused a connection from another user (SO_PEERCRED)")
                with self._lock:
                    self._conns.pop(peer.cid, None)
                try:
                    conn.settimeout(1.0)
                    send_msg(conn, {"error": {"status": 403, "code": "forbidden", "field": None, "message": "another user's process"}})
                except OSError:
                    pass
                finally:
                    conn.close()
                continue
            conn.setblocking(False)
            self._sel.register(conn, selectors.EVENT_READ, peer)

    def _peer_allowed(self, conn: socket.socket) -> bool:
        """SO_PEERCRED: the connecting process runs as this server's user or as root. (The file mode
        already keeps other users out; this also holds if the mode or a directory above is loosened.)"""
        try:
            _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        except OSError:
            return False
        return uid in (self._uid, 0)

    def _readable(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(peer)  # the client closed (or died)
            return
        peer.inbuf += data
        self._handle_buffered(peer)

    def _handle_buffered(self, peer: _Peer) -> None:
        """Handle the complete messages ``peer`` sent, until one goes to a worker."""
        buf = peer.inbuf
        while len(buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(buf)
            if n > (1 << 16 if peer.principal is None else self._control_limit):
                log.debug("local connection %d ends: a control message of %d bytes", peer.cid, n)
                self._drop(peer)
                return
            if len(buf) < _LEN.size + n:
                return
            try:
                msg = msgpack.unpackb(bytes(buf[_LEN.size : _LEN.size + n]), raw=False, strict_map_key=False)
            except (ValueError, msgpack.UnpackException) as e:
                log.debug("local connection %d ends: %s", peer.cid, e)
                self._drop(peer)
                return
            del buf[: _LEN.size + n]
            if peer.principal is None:
                self._to_worker(peer, self._do_hello, msg)
                return
            answered = self._answer_here(peer, msg)
            if answered is None:
                self._to_worker(peer, self._do_request, msg)
                return
            if not answered:
                return  # the connection went to a worker (or was dropped)

    def _answer_here(self, peer: _Peer, req) -> bool | None:
        """Answer a lookup on the loop thread when it needs no I/O and no wait. None: not answered (for a
        worker); True: answered; False: answered, and the connection went to a worker to finish sending
        (a client that does not read its answers) or was dropped."""
        if not (isinstance(req, dict) and req.get("op") == "lookup" and self.svc.store_is_local):
            return None
        from .core import WouldBlock

        t0 = time.perf_counter()
        try:
            answer = {"ok": self._dispatch(peer.principal, _seg(peer), req, wait=False)}
            status = 200
        except WouldBlock:
            return None  # the store's lock is taken: a worker waits for it
        except ServiceError as e:
            answer, status = {"error": e.to_dict()["error"] | {"status": e.status}}, e.status
        except Exception:  # a bug: logged, answered as 500, the connection goes on
            log.exception("local transport: lookup failed")
            answer, status = {"error": {"status": 500, "code": "internal", "message": "internal error", "field": None}}, 500
        data = msgpack.packb(answer, use_bin_type=True)
        msg = _LEN.pack(len(data)) + data
        try:
            sent = peer.sock.send(msg)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(peer)
            return False
        if self.svc.metrics is not None:
            self.svc.metrics.observe("local", "lookup", status, time.perf_counter() - t0)
        if sent < len(msg):  # the client does not read its answers: a worker waits for it to
            self._to_worker(peer, self._do_send, msg[sent:])
            return False
        return True

    def _to_worker(self, peer: _Peer, fn, arg) -> None:
        self._sel.unregister(peer.sock)
        bulk = isinstance(arg, dict) and arg.get("op") in ("put", "put_stream")
        try:
            (self._bulk if bulk else self._workers).submit(self._work, peer, fn, arg)
        except RuntimeError:  # shutting down
            self._drop(peer, registered=False)

    def _drop(self, peer: _Peer, *, registered: bool = True) -> None:
        if registered:
            try:
                self._sel.unregister(peer.sock)
            except (KeyError, ValueError):
                pass
        if peer.seg is not None:
            try:
                peer.seg.close()
            except BufferError:  # a view of it still alive somewhere: the mapping goes with it
                pass
            peer.seg = None
        peer.sock.close()
        with self._lock:
            self._conns.pop(peer.cid, None)

    # -- worker threads --------------------------------------------------------------------------
    def _work(self, peer: _Peer, fn, arg) -> None:
        keep = False
        try:
            peer.sock.setblocking(True)
            keep = fn(peer, arg)
            # the client's next request usually follows at once: served here, it costs no hop through the loop
            while keep and not peer.inbuf and not self._stopping.is_set():
                ready, _, _ = select.select([peer.sock], [], [], _LINGER_S)
                if not ready:
                    break
                req = recv_msg(peer.sock, self._control_limit)
                if req is None:
                    keep = False  # the client closed (or died)
                    break
                keep = self._do_request(peer, req)
            if keep:
                peer.sock.setblocking(False)
        except (OSError, ValueError, msgpack.UnpackException) as e:
            log.debug("local connection %d ends: %s", peer.cid, e)
            keep = False
        except Exception:  # a bug: logged, the connection ends
            log.exception("local transport: a request failed")
            keep = False
        finally:
            self._returned.append((peer, keep))
            try:
                self._wake_w.send(b"x")
            except (BlockingIOError, OSError):
                pass  # the loop is awake already (or stopped)

    def _do_hello(self, peer: _Peer, hello) -> bool:
        if not isinstance(hello, dict) or hello.get("op") != "hello":
            return False
        try:
            principal, nbytes = self._hello(hello)
        except ServiceError as e:
            send_msg(peer.sock, {"error": e.to_dict()["error"] | {"status": e.status}})
            return False
        fd = make_segment(nbytes)
        try:
            peer.seg = mmap.mmap(fd, nbytes)
            # cuda_ipc: this server maps CUDA IPC handles (service.cuda_ipc: put_cuda / get_cuda)
            # put_stream: this server takes streamed puts (_put_stream)
            hello_ok = {"segment_bytes": nbytes, "tenant": principal.tenant, "cuda_ipc": cuda_ipc.available(), "put_stream": True}
            send_msg(peer.sock, {"ok": hello_ok}, fds=[fd])
        finally:
            os.close(fd)  # the mapping keeps the memory; the client holds its own descriptor
        peer.principal = principal
        return True

    def _do_request(self, peer: _Peer, req) -> bool:
        t0 = time.perf_counter()
        op = req.get("op") if isinstance(req, dict) else None
        later: list = []  # (work, its undo) that may follow the answer (a put's page summaries)
        # earlier puts' summaries may still read their bytes of the segment. A put that lets its own be read
        # after its answer ("alt") runs alongside them: only those whose bytes it was written over are waited
        # for, and what they made is dropped (a cache: recomputed when a query needs it). A put that is not
        # "alt" may have been written anywhere: every pending one is waited for and dropped. Any other request
        # waits for them all first (a get writes its answer into the segment).
        alt_put = op == "put_stream" or (op == "put" and isinstance(req.get("args"), dict) and req["args"].get("alt") is True)
        if alt_put:
            _settle_overlapping(peer, req.get("off"), req.get("len"))
        else:
            # a query waits for this connection's pending summaries too: it would otherwise make them again itself
            _settle(peer, spoiled=op == "put", every=op in ("retrieve", "attention"))
        keep = True
        try:
            if not isinstance(req, dict):
                raise BadRequest("a request must be a map", field="op")
            if op == "put_stream":
                result, keep = self._put_stream(peer, req, later)
                answer = {"ok": result}
            else:
                answer = {"ok": self._dispatch(peer.principal, _seg(peer), req, later=later)}
            status = 200
        except _StreamLost as e:  # nothing can be answered: the connection ends
            log.debug("local connection %d: %s", peer.cid, e)
            return False
        except _StreamBroken as e:  # a streamed put's client broke the protocol: answered, then the connection ends
            answer, status, keep = {"error": e.error.to_dict()["error"] | {"status": e.error.status}}, e.error.status, False
        except ServiceError as e:
            answer = {"error": e.to_dict()["error"] | {"status": e.status}}
            status = e.status
        except Exception:  # a bug: logged, answered as 500, the connection goes on
            log.exception("local transport: %s failed", op)
            answer = {"error": {"status": 500, "code": "internal", "message": "internal error", "field": None}}
            status = 500
        send_msg(peer.sock, answer)
        if self.svc.metrics is not None:
            self.svc.metrics.observe("local", str(op)[:32], status, time.perf_counter() - t0)
        if later:  # a put's summaries read [off, off + len) of the segment after the answer (see above)
            _make_room_after(peer)
            lo = req.get("off", 0)
            # a streamed put's summaries read the stored blocks, not the segment: they hold no segment bytes up
            lo, hi = (0, 0) if op == "put_stream" and not req.get(_READS_SEGMENT) else (lo, lo + req.get("len", 0))
            try:
                peer.after.append((self._after.submit(_run_later, later, op), [undo for _, undo in later], lo, hi))
            except RuntimeError:  # shutting down: done here
                _run_later(later, op)
        return keep

    def _next_msg(self, peer: _Peer):
        """The connection's next control message (what the loop thread read ahead first), waiting at most
        ``local_stream_stall_s`` for its bytes (socket.timeout beyond); None: the client closed."""
        buf = peer.inbuf
        while True:
            if len(buf) >= _LEN.size:
                (n,) = _LEN.unpack_from(buf)
                if n > self._control_limit:
                    raise ValueError(f"a control message of {n} bytes")
                if len(buf) >= _LEN.size + n:
                    msg = msgpack.unpackb(bytes(buf[_LEN.size : _LEN.size + n]), raw=False, strict_map_key=False)
                    del buf[: _LEN.size + n]
                    return msg
            data = peer.sock.recv(1 << 16)
            if not data:
                return None
            buf += data

    def _stream_request(self, p, seg: mmap.mmap, req: dict, n: int):
        """A ``put_stream`` request's (model, spec, client keys, parent, off), checked as a one-shot put's
        (ServiceError otherwise); counts it against its tenant's rate."""
        svc = self.svc
        svc.admit(p)
        req[_ADMITTED] = True
        args = req.get("args")
        if not isinstance(args, dict):
            raise BadRequest("args must be a map", field="args")
        model = _str(args, "model")
        spec = svc.spec_of(p, model)
        raw_keys = args.get("keys")
        if isinstance(raw_keys, list) and len(raw_keys) > self.settings.max_blocks_per_request:
            # as a one-shot put's frames (and REST's body) more than the limit: 400
            raise BadRequest(
                f"the request holds more than {self.settings.max_blocks_per_request} blocks (max_blocks_per_request)", field="keys"
            )
        ckeys = svc._client_keys(raw_keys, "keys")
        if not ckeys:
            raise BadRequest("a put carries at least one block", field="keys")
        if len(set(ckeys)) != len(ckeys):
            raise BadRequest("keys repeat a key", field="keys")
        parent = args.get("parent")
        _check_parent(parent)
        nb = spec.block_nbytes
        off = req.get("off", 0)
        if n != nb * len(ckeys):
            raise BadRequest(f"len must be {nb * len(ckeys)} ({len(ckeys)} blocks of {nb} bytes)", field="len")
        if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off <= len(seg) - n:
            raise BadRequest(f"off must be an integer in [0, {max(0, len(seg) - n)}] (the segment less len)", field="off")
        return model, spec, ckeys, parent, off

    def _put_stream(self, peer: _Peer, req: dict, later: list) -> tuple[dict, bool]:
        """``put_stream``: the client sends the request first, then writes its blocks (each
        ``block_nbytes``, one after the other from ``off``) into the segment and says after each part how
        far it got (``{ready: bytes}``); its last message also carries each block's XXH3-64 checksum
        (``{ready: len, checksums: [...]}``). Meanwhile the server copies each part into the buffer its
        host tier will keep (``TieredStore.lease_buffer``) and hashes it there while it is still in cache,
        so the client's writing and the server's copying overlap; the checksums are compared with what
        the server holds before anything is stored (a mismatch: 400, nothing stored), and the host tier
        then keeps those buffers as the blocks (no second copy). The same validation, tenancy, quotas and
        limits as a put apply; a request refused before its bytes arrive still reads the client's
        messages to the last, then answers the error. Returns (answer, keep the connection)."""
        import xxhash

        svc, p, seg = self.svc, peer.principal, _seg(peer)
        raw_n = req.get("len")
        n: int = raw_n if isinstance(raw_n, int) and not isinstance(raw_n, bool) and raw_n >= 0 else -1  # -1: not a length
        error: ServiceError | None = None
        try:
            model, spec, ckeys, parent, off = self._stream_request(p, seg, req, n)
            nb = spec.block_nbytes
        except ServiceError as e:
            error, off = e, 0
            n = max(n, 0)  # the client's messages are read to the last (ready == len) before the error is answered
        bufs: list[torch.Tensor] = []
        store = svc.store
        # a first tier that keeps its own buffers (a host tier) lends them, and the parts are copied there; else
        # (a Redis or disk tier first) the blocks are stored from the segment itself, as a one-shot put's are
        copy = store.lends_buffers
        held = self._transfers if error is None else None
        if held is not None:
            held.acquire()
        try:
            base = None
            if error is None:
                base = torch.frombuffer(seg, dtype=torch.uint8)  # n > 0: at least one block
                bufs = [store.lease_buffer(nb) if copy else base[off + i * nb : off + (i + 1) * nb] for i in range(len(ckeys))]
                hashers = [xxhash.xxh3_64() for _ in ckeys]
            done, messages = 0, 0
            # parts of at least _MIN_PART bytes on average: a client cannot make the server handle a message per byte
            max_messages = 64 + max(n, 0) // _MIN_PART
            peer.sock.settimeout(self.settings.local_stream_stall_s)
            try:
                while True:
                    messages += 1
                    if messages > max_messages:
                        raise _StreamBroken(
                            BadRequest(
                                f"more than {max_messages} messages for {n} bytes: parts must average {_MIN_PART} bytes", field="ready"
                            )
                        )
                    try:
                        msg = self._next_msg(peer)
                    except (OSError, ValueError, msgpack.UnpackException) as e:  # a stall (timeout), a broken socket
                        raise _StreamLost(f"a streamed put ends: {e}") from None
                    if msg is None:
                        raise _StreamLost("the client closed the connection in a streamed put")
                    ready = msg.get("ready") if isinstance(msg, dict) else None
                    if isinstance(ready, bool) or not isinstance(ready, int) or not done <= ready <= n:
                        raise _StreamBroken(BadRequest(f"ready must be an integer in [{done}, {n}]", field="ready"))
                    if error is None and ready > done:
                        while done < ready:  # the part [done, ready), block by block
                            i, at = divmod(done, nb)
                            end = min(ready, (i + 1) * nb) - i * nb
                            dst = bufs[i][at:end]
                            if copy:
                                assert base is not None
                                dst.copy_(base[off + done : off + i * nb + end])
                            hashers[i].update(dst.numpy())
                            done = i * nb + end
                    done = ready
                    if "checksums" in msg:
                        if ready != n:
                            raise _StreamBroken(BadRequest(f"the last message must say ready {n}", field="ready"))
                        sums = msg["checksums"]
                        if error is None and (not isinstance(sums, list) or len(sums) != len(bufs)):
                            error = BadRequest(f"checksums must be a list of {len(bufs)} integers", field="checksums")
                        break
            finally:
                peer.sock.settimeout(None)
                base = None
            if error is not None:
                raise error
            for i, (h, c) in enumerate(zip(hashers, sums)):
                if h.intdigest() != c:
                    svc._rejected("invalid")
                    raise BadRequest(
                        f"blocks[{i}]: checksum mismatch (the bytes in the segment are not the block's)", field=f"checksums[{i}]"
                    )
            blocks = [b.view(spec.torch_dtype).view(spec.block_shape) for b in bufs]
            stored = svc.put(p, model, ckeys, blocks, parent, summarize=False)
        finally:
            if copy:
                for b in bufs:
                    store.release_buffer(b)
            if held is not None:
                held.release()
        if copy:
            later.append((lambda: svc.summarize_leased(p, ckeys, blocks, stored), lambda: None))
        else:  # the summaries read the segment after the answer: as an "alt" put's, undone if it is written over
            req[_READS_SEGMENT] = True
            later.append((lambda: svc.summarize(p, ckeys, blocks, stored), lambda: svc.discard_summaries(p, ckeys)))
        return {"stored": stored, "num_stored": sum(stored)}, True

    def _do_send(self, peer: _Peer, data: bytes) -> bool:
        peer.sock.sendall(data)
        return True

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

    def _dispatch(self, p, seg: mmap.mmap, req: dict, *, wait: bool = True, later: list | None = None):
        svc = self.svc
        if not req.get(_ADMITTED):  # msgpack gives str keys only: a client cannot set this marker
            svc.admit(p)  # the tenant's request rate (tenant_requests_per_s), as on REST and gRPC: 429 beyond it
            req[_ADMITTED] = True  # a lookup handed from the loop to a worker (WouldBlock) is not counted twice
        op, args = req.get("op"), req.get("args")
        if not isinstance(args, dict):
            raise BadRequest("args must be a map", field="args")
        n, off = req.get("len", 0), req.get("off", 0)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(seg):
            raise BadRequest(f"len must be an integer in [0, {len(seg)}] (the segment)", field="len")
        if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off <= len(seg) - n:
            raise BadRequest(f"off must be an integer in [0, {len(seg) - n}] (the segment less len)", field="off")
        if op == "lookup":
            return svc.lookup(
                p,
                _str(args, "model"),
                token_ids=args.get("token_ids"),
                hashes=args.get("hashes"),
                salt=args.get("salt", ""),
                extra_keys=args.get("extra_keys", []),
                return_keys=bool(args.get("return_keys", False)),
                wait=wait,
            )
        if op == "put":
            model = _str(args, "model")
            # "alt": the client writes its next put elsewhere in the segment (the other half), so these bytes
            # stay as they are until this connection's next request: the page summaries can follow the answer
            defer = args.get("alt") is True and svc.summarize_on_put
            with self._transfers:
                items = wire.split_items(memoryview(seg)[off : off + n], max_items=self.settings.max_blocks_per_request)
                if later is None or not defer:
                    stored = svc.put_frames(p, model, items, args.get("parent"))
                    return {"stored": stored, "num_stored": sum(stored)}
                _check_parent(args.get("parent"))  # before the frames, as put_frames does
                keys, blocks = svc.decode_frames(svc.spec_of(p, model), items)
                stored = svc.put(p, model, keys, blocks, args.get("parent"), summarize=False)
            later.append((lambda: svc.summarize(p, keys, blocks, stored), lambda: svc.discard_summaries(p, keys)))
            return {"stored": stored, "num_stored": sum(stored)}
        if op == "get":
            return self._get(p, seg, args)
        if op in ("put_cuda", "get_cuda"):
            return self._cuda(p, op, args)
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
        if op == "unregister_spec":
            return {"unregistered": svc.unregister_spec(p, _str(args, "model"))}
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

    def _cuda(self, p, op: str, args: dict) -> dict:
        """``put_cuda`` / ``get_cuda``: blocks named by CUDA IPC handles of the client's tensors
        (``service.cuda_ipc``), one per key. Every handle is checked before any is opened, so a bad
        request changes nothing. A put copies each block from the client's GPU memory to host memory
        and stores it as any put (the frame's checksum computed from those bytes); a get copies each
        verified block into the client's tensor and synchronizes the device before answering."""
        svc = self.svc
        model = _str(args, "model")
        spec = svc.spec_of(p, model)
        ckeys = svc._client_keys(args.get("keys"), "keys")
        handles = args.get("handles")
        if not isinstance(handles, list) or len(handles) != len(ckeys):
            raise BadRequest(f"handles must be a list of one CUDA IPC handle per key ({len(ckeys)})", field="handles")
        for i, h in enumerate(handles):
            cuda_ipc.check_handle(h, spec.block_shape, spec.torch_dtype, f"handles[{i}]")
        if not cuda_ipc.available():
            raise BadRequest("this server has no CUDA device: send the blocks through the segment", field="op")
        if op == "put_cuda":
            parent = args.get("parent")
            _check_parent(parent)
            with self._transfers:
                blocks = [cuda_ipc.open_block(h, spec.block_shape, spec.torch_dtype, f"handles[{i}]") for i, h in enumerate(handles)]
                host = [b.to("cpu") for b in blocks]  # synchronous: the client may reuse its tensors once answered
                del blocks
                stored = svc.put(p, model, ckeys, host, parent)
            return {"stored": stored, "num_stored": sum(stored)}
        with self._transfers:
            outs = [cuda_ipc.open_block(h, spec.block_shape, spec.torch_dtype, f"handles[{i}]") for i, h in enumerate(handles)]
            found = svc.get_checked(p, spec, ckeys)
            for o, b in zip(outs, found):
                if b is not None:
                    o.copy_(b)
            for d in {o.device for o in outs}:
                torch.cuda.synchronize(d)  # the copies have landed before the client reads them
            del outs
        return {"found": [b is not None for b in found]}


_QUERY_FIELDS = {"model", "q", "budget", "token_ids", "hashes", "salt", "extra_keys", "layers"}


class _StreamLost(Exception):
    """A streamed put's client stalled past ``local_stream_stall_s``, closed, or sent no message."""


class _StreamBroken(Exception):
    """A streamed put's client sent what the protocol does not allow: its later messages cannot be read
    as requests, so the error is answered and the connection ends."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(str(error))
        self.error = error


def _run_later(work: list, op) -> None:
    for fn, _ in work:
        try:
            fn()
        except Exception:  # summaries are a cache (recomputed when missing): the stored blocks stand
            log.exception("local transport: work after a %s failed", op)


def _settle(peer: _Peer, *, spoiled: bool = False, every: bool = False) -> None:
    """Wait for all the work after the connection's earlier answers (it reads the segment); ``spoiled``: the
    client may have written over those bytes meanwhile, so what the work made from them is undone. Work that
    reads no segment bytes (a streamed put's summaries) is left to go on, unless ``every``."""
    keep: deque = deque()
    while peer.after:
        work = peer.after.popleft()
        future, undos, lo, hi = work
        if lo == hi and not every:
            keep.append(work)
            continue
        future.result()
        if spoiled:
            _run_later([(undo, None) for undo in undos], "an overwritten put")
    peer.after = keep


def _make_room_after(peer: _Peer) -> None:
    """Before one more put's work is queued: while ``_MAX_AFTER`` are pending, the oldest is dropped if it has
    not started (those summaries are made when a query needs them), else waited for."""
    while len(peer.after) >= _MAX_AFTER:
        future, _, _, _ = peer.after.popleft()
        if not future.cancel():
            future.result()


def _settle_overlapping(peer: _Peer, off, n) -> None:
    """Before an "alt" put that the client wrote at ``[off, off + n)``: the pending work that read those bytes
    is waited for and undone (it may have read them half overwritten); the rest goes on."""
    if not peer.after:
        return
    if isinstance(off, bool) or isinstance(n, bool) or not isinstance(off, int) or not isinstance(n, int):
        _settle(peer, spoiled=True)  # a request the dispatch will refuse: whatever it wrote, nothing stays spoiled
        return
    keep: deque = deque()
    while peer.after:
        work = peer.after.popleft()
        future, undos, lo, hi = work
        if lo < off + n and off < hi:
            future.result()
            _run_later([(undo, None) for undo in undos], "an overwritten put")
        else:
            keep.append(work)
    peer.after = keep


def _check_parent(parent) -> None:
    """A put's ``parent`` is nil or a client key (BadRequest otherwise), checked before its blocks are read."""
    if parent not in (None, "", b""):
        from .core import parse_client_key

        parse_client_key(parent, "parent")


def _seg(peer: _Peer) -> mmap.mmap:
    if peer.seg is None:
        raise RuntimeError("a request on a connection without a segment")  # requests follow the hello
    return peer.seg


def _str(args: dict, name: str) -> str:
    v = args.get(name)
    if not isinstance(v, str) or len(v) > MAX_NAMESPACE_CHARS:
        raise BadRequest(f"{name} must be a string", field=name)
    return v


def close_server(server: LocalServer) -> None:
    server._stopping.set()
    try:
        server._wake_w.send(b"x")
    except OSError:
        pass
    server._thread.join(timeout=10)
    server.path.unlink(missing_ok=True)
    server._workers.shutdown(wait=False)
    server._bulk.shutdown(wait=False)
    server._after.shutdown(wait=False)
