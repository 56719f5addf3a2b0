"""The gRPC server: the operations of the REST API over ``service/proto/kvtier.proto``.

It runs in the process of ``kvtier serve`` next to the REST app (started and stopped by the app's
lifespan), over the same ``KVService``: the same validation, tenants, quotas and metrics. Calls
run in a thread pool; block transfers stream one frame per message.

The two messages that carry blocks are read and written by ``grpc_wire`` rather than protobuf's
classes: a put's frame is a view of the received message (no copy before the host tier's own), and
a get's reply is the frame's header and the block joined once. A put is answered as soon as the
blocks are stored; their page summaries (retrieval) are computed after the answer, as on the local
transport.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent import futures
from contextlib import contextmanager

import grpc
import numpy as np

from . import grpc_wire, wire
from .core import KVService, parse_client_key
from .errors import BadRequest, PayloadTooLarge, ServiceError, Unavailable
from .proto import kvtier_pb2 as pb
from .proto import kvtier_pb2_grpc as pb_grpc
from .settings import Settings
from .tenancy import Authenticator, Principal

log = logging.getLogger("kvtier.grpc")
GET_GROUP_BYTES = 32 << 20
_SUMMARY_BACKLOG = 4  # puts whose summaries may wait for the summary thread (each holds its blocks)


def add_servicer(servicer: "KVTierServicer", server: grpc.Server) -> None:
    """``kvtier_pb2_grpc.add_KVTierServicer_to_server`` with ``grpc_wire``'s (de)serializers for the
    messages that carry blocks: ``PutBlocks`` requests are parsed into views, ``GetBlocks`` replies
    are yielded as bytes already."""
    service = pb.DESCRIPTOR.services_by_name["KVTier"]
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for m in service.methods:
        deserialize = getattr(pb, m.input_type.name).FromString
        serialize = getattr(pb, m.output_type.name).SerializeToString
        if m.name == "PutBlocks":
            deserialize = grpc_wire.parse_put_request
        elif m.name == "GetBlocks":
            serialize = None  # the handler yields each reply's bytes
        make = kinds[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=deserialize, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def message_limit(settings: Settings) -> int:
    """Largest gRPC message: one frame of the largest block, or the largest JSON-ish request."""
    return int(max(settings.max_block_bytes, settings.max_json_bytes) + (1 << 20))


def _abort(context: grpc.ServicerContext, e: ServiceError):
    if e.field:
        context.set_trailing_metadata((("kvtier-field", e.field),))
    context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message)


def _rpc(op: str):
    """Authenticate, map ServiceError to a status, and observe latency (unary and response-streaming)."""

    def wrap(fn):
        def unary(self, request, context):
            t0 = time.perf_counter()
            code = "OK"
            try:
                p = self.principal(context)
                return fn(self, p, request, context)
            except ServiceError as e:
                code = e.grpc_code
                _abort(context, e)
            except _Cancelled:
                code = "CANCELLED"
            except Exception:
                code = "INTERNAL"
                raise
            finally:
                self.observe(op, code, t0)

        def streaming(self, request, context):
            t0 = time.perf_counter()
            code = "OK"
            try:
                p = self.principal(context)
                yield from fn(self, p, request, context)
            except ServiceError as e:
                code = e.grpc_code
                _abort(context, e)
            except _Cancelled:
                code = "CANCELLED"
            finally:
                self.observe(op, code, t0)

        import inspect

        return streaming if inspect.isgeneratorfunction(fn) else unary

    return wrap


class KVTierServicer(pb_grpc.KVTierServicer):
    def __init__(self, svc: KVService, settings: Settings, auth: Authenticator) -> None:
        self.svc = svc
        self.settings = settings
        self.auth = auth
        # block transfers (and retrieval/attention, which read blocks) in progress at once, as REST's
        # own bound: each put stream holds up to max_request_bytes of frames while it is read
        self._transfers = threading.BoundedSemaphore(settings.max_concurrent_transfers)
        # graceful stop: calls in progress (counted from ``principal`` to ``observe``) and the drain flag
        self._active = 0
        self._active_cond = threading.Condition()
        self._draining = False
        # page summaries of put blocks, computed after the answer (at most _SUMMARY_BACKLOG waiting, then inline)
        self._summaries = futures.ThreadPoolExecutor(1, thread_name_prefix="kvtier-grpc-summaries")
        self._summary_slots = threading.BoundedSemaphore(_SUMMARY_BACKLOG)

    def drain(self, timeout_s: float) -> bool:
        """Answer every new call UNAVAILABLE ("kvtier is stopping", which clients retry elsewhere or
        later) and wait up to ``timeout_s`` for the calls in progress to finish. True if none is left.
        Then ``server.stop`` cancels nothing that was accepted: a call the server's shutdown would
        otherwise have cancelled (CANCELLED, not retryable) is refused before it starts."""
        deadline = time.monotonic() + timeout_s
        with self._active_cond:
            self._draining = True
            while self._active > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._active_cond.wait(left)
        return True

    @contextmanager
    def transfer(self, context):
        """Hold one of ``max_concurrent_transfers`` slots; a call cancelled while it waits gives up."""
        while not self._transfers.acquire(timeout=0.5):
            if not context.is_active():
                raise _Cancelled()
        try:
            yield
        finally:
            self._transfers.release()

    def principal(self, context) -> Principal:
        """The caller of a call that starts now (every handler calls it first; ``observe`` ends it)."""
        with self._active_cond:
            self._active += 1
            if self._draining:
                raise Unavailable("kvtier is stopping: try again")
        md = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
        return self.svc.admit(self.auth.authenticate(md.get("authorization"), md.get("x-api-key")))

    def observe(self, op: str, code: str, t0: float) -> None:
        with self._active_cond:
            self._active -= 1
            if self._active == 0:
                self._active_cond.notify_all()
        if self.svc.metrics is not None:
            self.svc.metrics.observe("grpc", op, code, time.perf_counter() - t0)

    @_rpc("RegisterSpec")
    def RegisterSpec(self, p, request, context):
        fields = {
            "model_id": request.model_id,
            "num_layers": request.num_layers,
            "num_kv_heads": request.num_kv_heads,
            "head_dim": request.head_dim,
            "dtype": request.dtype or "float16",
            "block_tokens": request.block_tokens or 256,
        }
        model, spec = self.svc.register_spec(p, fields)
        return pb.SpecReply(model=model, block_nbytes=spec.block_nbytes)

    @_rpc("UnregisterSpec")
    def UnregisterSpec(self, p, request, context):
        self.svc.unregister_spec(p, request.model)
        return pb.UnregisterReply(unregistered=True)

    @_rpc("Lookup")
    def Lookup(self, p, request, context):
        kwargs = dict(salt=request.salt, extra_keys=list(request.extra_keys), return_keys=request.return_keys)
        if request.hashes:
            out = self.svc.lookup(p, request.model, hashes=list(request.hashes), **kwargs)
        else:
            out = self.svc.lookup(p, request.model, token_ids=np.asarray(request.token_ids, dtype=np.int64), **kwargs)
        return pb.LookupReply(
            model=out["model"],
            num_blocks=out["num_blocks"],
            num_tokens=out["num_tokens"],
            num_requested_blocks=out["num_requested_blocks"],
            tier_hits=out["tier_hits"],
            tier_prefix=out["tier_prefix"],
            keys=[bytes.fromhex(k) for k in out.get("keys", ())],
        )

    def PutBlocks(self, request_iterator, context):
        t0 = time.perf_counter()
        code = "OK"
        try:
            p = self.principal(context)
            with self.transfer(context):
                return self._put_blocks(p, request_iterator, context)
        except ServiceError as e:
            code = e.grpc_code
            _abort(context, e)
        except (_Cancelled, grpc.RpcError):
            if context.is_active():
                code = "INTERNAL"
                raise
            code = "CANCELLED"  # the client went away mid-upload: not our error
        finally:
            self.observe("PutBlocks", code, t0)

    def _put_blocks(self, p, request_iterator, context):
        model, parent, frames, total = None, None, [], 0
        for i, msg in enumerate(request_iterator):
            if i == 0:
                model = msg.model
                self.svc.spec_of(p, model)  # NOT_FOUND before the frames are read
                if msg.parent:
                    parent = parse_client_key(msg.parent, "parent")
            elif msg.model and msg.model != model:
                raise BadRequest(f"frames[{i}]: every message of a put names the same model", field="model")
            if len(frames) >= self.settings.max_blocks_per_request:
                raise PayloadTooLarge(
                    f"more than {self.settings.max_blocks_per_request} frames (max_blocks_per_request)", field=f"frames[{i}]"
                )
            frame = msg.frame  # one access: each access of a bytes field may copy it
            total += len(frame)
            if total > self.settings.max_request_bytes:
                raise PayloadTooLarge(f"the put stream exceeds max_request_bytes ({self.settings.max_request_bytes})", field=f"frames[{i}]")
            frames.append(memoryview(frame) if frame else None)
        if model is None:
            raise BadRequest("the put stream holds no frames", field="frames")
        if not context.is_active():
            raise _Cancelled()  # the stream ended because the client cancelled it: store nothing
        keys, blocks = self.svc.decode_frames(self.svc.spec_of(p, model), frames)
        stored = self.svc.put(p, model, keys, blocks, parent, summarize=False)
        self._summarize_later(p, keys, blocks, stored)
        return pb.PutReply(stored=stored, num_stored=sum(stored))

    def _summarize_later(self, p, keys, blocks, stored) -> None:
        """The page summaries of a put's blocks, on the summary thread (inline when it lags behind)."""
        if not self.svc.summarize_on_put or not any(stored):
            return
        if not self._summary_slots.acquire(blocking=False):
            self.svc.summarize(p, keys, blocks, stored)
            return

        def run() -> None:
            try:
                self.svc.summarize(p, keys, blocks, stored)
            except Exception:
                log.exception("gRPC: page summaries of a put failed")
            finally:
                self._summary_slots.release()

        try:
            self._summaries.submit(run)
        except RuntimeError:  # shut down (the server is stopping)
            self._summary_slots.release()

    def close(self) -> None:
        self._summaries.shutdown(wait=True)

    @_rpc("GetBlocks")
    def GetBlocks(self, p, request, context):
        spec, ckeys = self.svc.spec_of(p, request.model), None
        ckeys = self.svc._client_keys(list(request.keys), "keys")
        group = max(1, GET_GROUP_BYTES // spec.block_nbytes)
        with self.transfer(context):
            for i in range(0, len(ckeys), group):
                keys = ckeys[i : i + group]
                # the tiers copy into pooled buffers (memory already mapped), each reply copies out of them once
                bufs = self.svc.buffers.take(spec.block_nbytes, len(keys))
                try:
                    outs = [b.view(spec.torch_dtype).view(spec.block_shape) for b in bufs]
                    for k, block in zip(keys, self.svc.get_checked(p, spec, keys, out=outs)):
                        if block is None:
                            yield grpc_wire.block_reply(k)
                        else:  # the BlockReply's bytes (GetBlocks has no serializer): header and block joined once
                            yield grpc_wire.block_reply(k, self.svc.encode_block_parts(spec, k, block))
                finally:
                    self.svc.buffers.give(bufs)

    @_rpc("DeleteBlocks")
    def DeleteBlocks(self, p, request, context):
        return pb.DeleteReply(removed=self.svc.delete(p, request.model, list(request.keys)))

    @_rpc("Pin")
    def Pin(self, p, request, context):
        info = self.svc.pin(p, request.model, list(request.keys), request.ttl_s)
        return pb.PinReply(lease_id=info.id, ttl_s=request.ttl_s, num_pinned=info.num_pinned)

    @_rpc("Unpin")
    def Unpin(self, p, request, context):
        self.svc.unpin(p, request.lease_id)
        return pb.UnpinReply(unpinned=True)

    @_rpc("Stats")
    def Stats(self, p, request, context):
        return pb.JsonReply(json=json.dumps(self.svc.stats(p)))

    @_rpc("Events")
    def Events(self, p, request, context):
        if request.after > 2**62:
            raise BadRequest("after must be at most 2**62", field="after")
        return pb.JsonReply(json=json.dumps(self.svc.events(p, int(request.after), int(request.limit or 1000))))

    def _query_kwargs(self, request) -> dict:
        kw = dict(salt=request.salt, extra_keys=list(request.extra_keys), layers=list(request.layers) or None)
        if request.hashes:
            kw["hashes"] = list(request.hashes)
        else:
            kw["token_ids"] = np.asarray(request.token_ids, dtype=np.int64)
        if not request.HasField("q"):
            raise BadRequest("q is required: the decode query [L_q, H_q, head_dim]", field="q")
        kw["q"] = {"dtype": request.q.dtype, "shape": [int(n) for n in request.q.shape], "data": request.q.data}
        return kw

    @_rpc("Retrieve")
    def Retrieve(self, p, request, context):
        kw = self._query_kwargs(request)
        with self.transfer(context):
            out = self.svc.retrieve(p, request.model, budget=request.budget or None, **kw)
        return pb.RetrieveReply(
            model=out["model"],
            layers=out["layers"],
            budget=out["budget"],
            num_tokens=out["num_tokens"],
            num_blocks=out["num_blocks"],
            num_requested_blocks=out["num_requested_blocks"],
            token_ids=_tensor_msg(out["token_ids"]),
            fetched=out["fetched"],
            summarized=out["summarized"],
        )

    @_rpc("Attention")
    def Attention(self, p, request, context):
        kw = self._query_kwargs(request)
        with self.transfer(context):
            out = self.svc.attention(p, request.model, budget=request.budget or None, **kw)
        return pb.AttentionReply(
            model=out["model"],
            layers=out["layers"],
            budget=out["budget"] or 0,
            num_tokens=out["num_tokens"],
            num_blocks=out["num_blocks"],
            num_requested_blocks=out["num_requested_blocks"],
            attended=out["attended"],
            fetched=out["fetched"],
            o=_tensor_msg(out["o"]),
            lse=_tensor_msg(out["lse"]),
        )

    def Health(self, request, context):
        ready, tiers = self.svc.readiness()
        return pb.HealthReply(ready=ready, tiers=tiers)


class _Cancelled(Exception):
    """The client cancelled the call (or went away) while it waited or streamed."""


def _tensor_msg(t) -> pb.Tensor:
    w = wire.tensor_to_wire(t)
    return pb.Tensor(dtype=w["dtype"], shape=w["shape"], data=w["data"])


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC core options: message sizes, and the connection hygiene of REST's guards (docs/hardening.md)."""
    limit = message_limit(settings)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
        # connections: a cap on how many are open, idle ones closed, a handshake that must finish in time
        ("grpc.max_allowed_incoming_connections", settings.grpc_max_connections),
        ("grpc.max_connection_idle_ms", int(settings.grpc_idle_timeout_s * 1000)),
        ("grpc.server_handshake_timeout_ms", int(settings.header_timeout_s * 1000)),
        ("grpc.max_concurrent_streams", settings.grpc_max_streams_per_connection),
        # keepalive: the server pings a connection silent for a minute and drops it if the peer is gone;
        # a client may not ping more often than every 10 s (nor at all without calls): 2 strikes, GOAWAY
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def start_grpc_server(svc: KVService, settings: Settings, auth: Authenticator, *, max_workers: int = 32) -> grpc.Server:
    """Start the gRPC server on ``settings.host:settings.grpc_port``; ``server.kvtier_port`` is the bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvtier-grpc"),
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.limit_concurrency,
    )
    servicer = KVTierServicer(svc, settings, auth)
    add_servicer(servicer, server)
    server.kvtier_servicer = servicer
    host = settings.host if ":" not in settings.host else f"[{settings.host}]"
    if settings.tls_cert is not None:  # the same certificate as REST's HTTPS
        assert settings.tls_key is not None  # the settings refuse a certificate without its key
        creds = grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())])
        port = server.add_secure_port(f"{host}:{settings.grpc_port}", creds)
    else:
        port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    if port == 0:
        raise RuntimeError(f"gRPC could not bind {host}:{settings.grpc_port}")
    server.start()
    server.kvtier_port = port
    log.info("gRPC serving on %s:%d", host, port)
    return server


def stop_grpc_server(server: grpc.Server, grace_s: float) -> None:
    """Graceful stop: drain (new calls UNAVAILABLE, calls in progress finish within ``grace_s``), then stop."""
    t0 = time.monotonic()
    if not server.kvtier_servicer.drain(grace_s):
        log.warning("gRPC: calls still in progress after %.1fs: they are cancelled", grace_s)
    server.stop(max(0.0, grace_s - (time.monotonic() - t0))).wait()
    server.kvtier_servicer.close()
