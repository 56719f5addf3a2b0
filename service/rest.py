"""The REST API (FastAPI): ``create_app(settings)``; OpenAPI at ``/docs`` and ``/openapi.json``.

Every route is a thin shell over ``KVService`` (``service.core``), which validates and raises
``ServiceError`` for a caller's mistake; here those become ``{"error": {"code", "message",
"field"}}`` with their 4xx status, and so do FastAPI's own validation errors (422, the field is
the path of the offending value). Bodies are bounded before they are read (``BodyLimit``).
Blocking work (disk, Redis, copying megabytes) runs in worker threads.
"""


import asyncio
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

import msgpack
import numpy as np
import torch
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import wire
from .core import KVService, WouldBlock, open_service, parse_client_key
from .errors import BadRequest, Forbidden, ServiceError, UnsupportedMediaType
from .metrics import CONTENT_TYPE, Metrics
from .settings import Settings
from .tenancy import Authenticator, Principal

log = logging.getLogger("kvtier.rest")

HEX64 = r"^[0-9a-fA-F]{64}$"
Hash = Annotated[str, Field(pattern=HEX64, description="a block hash: 64 hex characters (32 bytes)")]
GET_GROUP_BYTES = 32 << 20  # a streamed get fetches this many bytes of blocks at a time


# -- request and response models -----------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpecIn(_Strict):
    model_id: str = Field(min_length=1, max_length=256)
    num_layers: int = Field(ge=1, le=4096)
    num_kv_heads: int = Field(ge=1, le=4096)
    head_dim: int = Field(ge=1, le=4096)
    dtype: str = Field("float16", max_length=32, description="float16, bfloat16, float32 or float8_e4m3fn")
    block_tokens: int = Field(256, ge=16, le=1 << 20, description="a multiple of 16")


class SpecOut(BaseModel):
    model: str = Field(description="the model id to use in every other call (hex of the spec's fingerprint)")
    spec: dict
    block_nbytes: int
    block_shape: list[int]


class LookupIn(_Strict):
    model: str = Field(max_length=64)
    token_ids: list[Annotated[int, Field(ge=0, le=0xFFFFFFFF)]] | None = Field(
        None, description="the sequence's token ids; the server hashes its full blocks under the caller's tenant")
    hashes: list[Hash] | None = Field(None, description="the chain's block hashes (instead of token_ids)")
    salt: str = Field("", max_length=256, description="cache salt (part of the namespace; with token_ids)")
    extra_keys: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=16,
                                                                    description="LoRA ids, multimodal hashes, ... (with token_ids)")
    return_keys: bool = Field(False, description="also return the chain's block hashes (to put blocks under)")


class LookupOut(BaseModel):
    model: str
    num_blocks: int = Field(description="longest cached prefix, in blocks")
    num_tokens: int
    num_requested_blocks: int
    tier_hits: dict[str, int] = Field(description="of the cached prefix, how many blocks each tier would serve")
    tier_prefix: dict[str, int] = Field(description="longest prefix each tier holds on its own")
    keys: list[str] | None = None


class KeysIn(_Strict):
    model: str = Field(max_length=64)
    keys: list[Hash] = Field(min_length=1)


class PutOut(BaseModel):
    stored: list[bool]
    num_stored: int


class DeleteOut(BaseModel):
    removed: int


class PinIn(KeysIn):
    ttl_s: float = Field(gt=0, description="lease length in seconds (at most max_pin_ttl_s)")


class PinOut(BaseModel):
    lease_id: int
    ttl_s: float
    num_pinned: int


TensorData = Annotated[bytes | str, WithJsonSchema({"type": "string", "contentEncoding": "base64", "description":
                      "the raw little-endian elements in C order: base64 text in JSON, bytes (bin) in msgpack"})]


class TensorIn(_Strict):
    dtype: str = Field(max_length=16, description="float16, bfloat16 or float32")
    shape: list[Annotated[int, Field(ge=0, le=1 << 20)]] = Field(max_length=8)
    data: TensorData


class TensorOut(BaseModel):
    dtype: str = Field(description="float32 (o, lse) or int64 (token_ids)")
    shape: list[int]
    data: str = Field(description="the raw little-endian elements in C order (base64 in JSON, bin in msgpack)")


class _QueryIn(_Strict):
    model: str = Field(max_length=64)
    token_ids: list[Annotated[int, Field(ge=0, le=0xFFFFFFFF)]] | None = Field(
        None, description="the sequence's token ids; the server hashes its full blocks under the caller's tenant")
    hashes: list[Hash] | None = Field(None, description="the chain's block hashes (instead of token_ids)")
    salt: str = Field("", max_length=256, description="cache salt (with token_ids)")
    extra_keys: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=16,
                                                                    description="LoRA ids, multimodal hashes, ... (with token_ids)")
    q: TensorIn = Field(description="one decode query per layer asked: [L_q, H_q, head_dim], float16/bfloat16/float32, "
                                    "H_q a multiple of num_kv_heads (GQA)")
    layers: list[Annotated[int, Field(ge=0, le=1 << 16)]] | None = Field(
        None, max_length=1 << 16, description="the layers of q's rows, distinct (default: every layer, in order)")


class RetrieveIn(_QueryIn):
    budget: int = Field(ge=1, le=1 << 31, description="tokens per (layer, KV head), sinks and recent window included")


class AttentionIn(_QueryIn):
    budget: int | None = Field(None, ge=1, le=1 << 31, description="sparse: the tokens StoreRetriever selects per (layer, KV head); "
                                                                   "absent: every cached token of the chain")


class RetrieveOut(BaseModel):
    model: str
    layers: list[int]
    budget: int
    num_tokens: int = Field(description="tokens of the cached prefix searched (0: nothing cached for this tenant)")
    num_blocks: int
    num_requested_blocks: int
    token_ids: TensorOut = Field(description="int64 [L_q, num_kv_heads, budget]: positions in the sequence, ascending, -1 padding")
    fetched: list[int] = Field(description="chain positions of the blocks read to gather the selection")
    summarized: int = Field(description="blocks read only to compute a summary no longer in memory")


class AttentionOut(BaseModel):
    model: str
    layers: list[int]
    budget: int | None
    num_tokens: int = Field(description="tokens of the cached prefix (0: nothing cached: o = 0, lse = -inf)")
    num_blocks: int
    num_requested_blocks: int
    attended: int = Field(description="most tokens one (layer, KV head) attended")
    fetched: list[int] = Field(description="chain positions of the blocks read")
    o: TensorOut = Field(description="float32 [L_q, H_q, head_dim]")
    lse: TensorOut = Field(description="float32 [L_q, H_q], natural log; -inf where nothing was attended")


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


ERRORS = {s: {"model": ErrorOut} for s in (400, 401, 403, 404, 413, 415, 422, 429)}


# -- body limit ------------------------------------------------------------------------------
class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body beyond its limit gets 413 before (or while) it is read.

    Block uploads (``PUT /v1/blocks``) may carry ``max_request_bytes``; every other body
    ``max_json_bytes``. A declared Content-Length over the limit is refused before any byte is read.
    """

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.blocks_limit = settings.max_request_bytes
        self.json_limit = settings.max_json_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.blocks_limit if scope["path"] == "/v1/blocks" and scope["method"] == "PUT" else self.json_limit
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_error(send, 400, "invalid", "Content-Length is not an integer", "content-length")
                if declared > limit:
                    return await _send_error(send, 413, "too_large", f"the body has {declared} bytes, at most {limit} are allowed", "body")
        seen = 0
        started = exceeded = False
        message_413 = f"the body has more than {limit} bytes"

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if exceeded:  # the app turned _TooLarge into an answer of its own (FastAPI: 400 "error parsing the body")
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_error(send, 413, "too_large", message_413, "body")
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, "too_large", message_413, "body")


async def _send_error(send, status: int, code: str, message: str, field: str | None) -> None:
    import json

    body = json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Observe:
    """ASGI middleware: latency and status of every request, labelled by its route template."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            svc = getattr(scope["app"].state, "svc", None) if "app" in scope else None
            if svc is not None and svc.metrics is not None:
                route = scope.get("route")
                op = getattr(route, "path", None) or scope.get("kvtier_op", "unmatched")
                svc.metrics.observe("rest", f"{scope['method']} {op}", status, time.perf_counter() - t0)


_HEX64 = re.compile(HEX64[1:-1])
_LOOKUP_FIELDS = {"model", "token_ids", "hashes", "salt", "extra_keys", "return_keys"}
_JSON_HEADERS = [(b"content-type", b"application/json")]


class FastLookup:
    """ASGI middleware: ``POST /v1/lookup`` without the framework's per-request machinery.

    Lookups are the most frequent call (one per engine request) and take tens of microseconds in
    the store; FastAPI's dependency solving, body model and response model cost several times that.
    A well-formed request (a JSON object of the documented fields with the documented types) is
    answered here by the same ``KVService.lookup``; anything else goes on, body replayed, to the
    FastAPI route, so every error is the route's own (the route also documents the call in OpenAPI).
    """

    def __init__(self, app, settings: Settings, auth: Authenticator) -> None:
        self.app = app
        self.limit = settings.max_json_bytes
        self.auth = auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/lookup" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        svc = getattr(scope["app"].state, "svc", None) if "app" in scope else None
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if svc is None or not svc.store_is_local or declared is None or not declared.isdigit() or int(declared) > min(self.limit, 1 << 20):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        req = _well_formed_lookup(body)
        if req is None:
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        scope["kvtier_op"] = "/v1/lookup"
        headers = {k: v for k, v in scope.get("headers", ()) if k in (b"authorization", b"x-api-key")}
        try:
            p = self.auth.authenticate(headers.get(b"authorization", b"").decode("latin-1") or None,
                                       headers.get(b"x-api-key", b"").decode("latin-1") or None)
            kwargs = dict(token_ids=req.get("token_ids"), hashes=req.get("hashes"), salt=req.get("salt", ""),
                          extra_keys=req.get("extra_keys", []), return_keys=req.get("return_keys", False))
            try:  # in memory, microseconds: no thread hop, unless the store's lock is taken right now
                out = svc.lookup(p, req["model"], wait=False, **kwargs)
            except WouldBlock:
                out = await run_in_threadpool(lambda: svc.lookup(p, req["model"], **kwargs))
            status, payload = 200, out
        except ServiceError as e:
            status, payload = e.status, e.to_dict()
        data = json.dumps(payload, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": _JSON_HEADERS + [(b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def _well_formed_lookup(body: bytes) -> dict | None:
    """The request when it is exactly what the route's model accepts (types only; values are KVService's job)."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(req, dict) or not req.keys() <= _LOOKUP_FIELDS or not isinstance(req.get("model"), str) or len(req["model"]) > 64:
        return None
    tokens, hashes = req.get("token_ids"), req.get("hashes")
    if (tokens is None) == (hashes is None):
        return None
    if tokens is not None and not (isinstance(tokens, list) and all(type(t) is int and 0 <= t <= 0xFFFFFFFF for t in tokens)):
        return None
    if hashes is not None and not (isinstance(hashes, list) and all(isinstance(h, str) and _HEX64.fullmatch(h) for h in hashes)):
        return None
    if not isinstance(req.get("salt", ""), str) or len(req.get("salt", "")) > 256:
        return None
    extra = req.get("extra_keys", [])
    if not (isinstance(extra, list) and len(extra) <= 16 and all(isinstance(k, str) and len(k) <= 256 for k in extra)):
        return None
    if not isinstance(req.get("return_keys", False), bool):
        return None
    return req


async def _query_body(request: Request, model_cls):
    """The body of /v1/retrieve or /v1/attention (JSON or msgpack) validated by ``model_cls``, and whether it was msgpack."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    raw = await request.body()
    if ctype == wire.MSGPACK_MEDIA_TYPE:
        try:
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as e:  # whatever msgpack raises on bytes that are not one msgpack object
            raise BadRequest(f"the body is not one msgpack object: {type(e).__name__}", field="body") from None
        binary = True
    elif ctype == "application/json" or ctype.endswith("+json"):
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not JSON: {e}"[:300], field="body") from None
        binary = False
    else:
        raise UnsupportedMediaType(f"the body must be application/json or {wire.MSGPACK_MEDIA_TYPE}, got {ctype!r}"[:300],
                                   field="content-type")
    try:
        return model_cls.model_validate(obj), binary
    except ValidationError as e:
        raise RequestValidationError([{k: v for k, v in err.items() if k in ("loc", "msg", "type")} for err in e.errors()]) from None


def _query_answer(out: dict, binary: bool) -> Response:
    """The answer of /v1/retrieve or /v1/attention: tensors as {dtype, shape, data} (bin in msgpack, base64 in JSON)."""
    doc = {k: wire.tensor_to_wire(v, binary=binary) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    if binary:
        return Response(msgpack.packb(doc, use_bin_type=True), media_type=wire.MSGPACK_MEDIA_TYPE)
    return JSONResponse(doc)


def _error(status: int, code: str, message: str, field: str | None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=status)


# -- the app ---------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, service: KVService | None = None) -> FastAPI:
    """The REST app. It opens the store on startup (unless ``service`` is given) and closes it on shutdown.

    When ``settings.grpc_port`` is set the gRPC server runs in the same process, started and
    stopped with the app.
    """
    settings = settings or Settings()
    auth = Authenticator(settings)
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key>")
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="or X-API-Key: <api key>")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = service or await run_in_threadpool(open_service, settings, Metrics)
        if svc.metrics is None:
            svc.metrics = Metrics(svc)
        app.state.svc = svc
        app.state.transfers = asyncio.Semaphore(settings.max_concurrent_transfers)
        grpc_server = None
        if settings.grpc_port is not None:
            from .grpc_server import start_grpc_server

            grpc_server = start_grpc_server(svc, settings, auth)
            app.state.grpc_port = grpc_server.kvtier_port
        local_server = None
        if settings.local_socket is not None:
            from .local import LocalServer

            local_server = LocalServer(svc, settings, auth)
            app.state.local_server = local_server
        try:
            yield
        finally:
            if local_server is not None:
                from .local import close_server

                close_server(local_server)
            if grpc_server is not None:
                await run_in_threadpool(lambda: grpc_server.stop(settings.graceful_shutdown_s).wait())
            if service is None:
                await run_in_threadpool(svc.close)
            log.info("kvtier stopped: store closed")

    app = FastAPI(
        title="kvtier", version="1", lifespan=lifespan,
        description="KV-cache tier: longest-prefix lookup, block put/get/delete as msgpack frames, pins, stats, events. "
                    "Block bodies are msgpack streams of `bin` items (one frame each) or `nil` (a miss).",
    )
    app.add_middleware(BodyLimit, settings=settings)

    # -- errors: every caller mistake is a 4xx naming the field -------------------------------
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        return JSONResponse(e.to_dict(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
        field = ".".join(loc) or "body"
        msg = f"{field}: {first.get('msg', 'invalid')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return _error(422, "invalid", msg, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid")
        return _error(e.status_code, code, str(e.detail), None)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):  # never the answer to bad input: a bug, logged
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal", f"internal error: {type(e).__name__}", None)

    # -- metrics of every request (pure ASGI: no extra task per request) ---------------------
    app.add_middleware(FastLookup, settings=settings, auth=auth)
    app.add_middleware(Observe)

    async def principal(request: Request, _bearer: HTTPAuthorizationCredentials | None = Depends(bearer),
                  _key: str | None = Depends(api_key_header)) -> Principal:
        # the security dependencies only document the two headers in OpenAPI; the raw headers decide
        return auth.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))

    P = Annotated[Principal, Depends(principal)]

    def svc_of(request: Request) -> KVService:
        return request.app.state.svc

    # -- health ----------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: every tier reachable (503 otherwise)")
    async def readyz(request: Request):
        ok, tiers = await run_in_threadpool(svc_of(request).readiness)
        return JSONResponse({"ready": ok, "tiers": tiers}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request):
        if not settings.open_mode and settings.metrics_auth:
            p = auth.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
            if not p.is_admin:
                raise Forbidden("/metrics needs the admin key (metrics_auth)", field="authorization")
        body = await run_in_threadpool(svc_of(request).metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    # -- specs -----------------------------------------------------------------------------
    @app.post("/v1/specs", response_model=SpecOut, tags=["specs"], responses=ERRORS,
              summary="Register a model's KV spec; returns the model id to use in every other call")
    async def register_spec(body: SpecIn, request: Request, p: P):
        model, spec = await run_in_threadpool(svc_of(request).register_spec, p, body.model_dump())
        return SpecOut(model=model, spec=spec.to_dict(), block_nbytes=spec.block_nbytes, block_shape=list(spec.block_shape))

    @app.get("/v1/specs", tags=["specs"], responses=ERRORS, summary="The caller's registered specs")
    async def list_specs(request: Request, p: P) -> dict[str, dict]:
        return {m: s.to_dict() for m, s in svc_of(request).registry.models_of(p.tenant).items()}

    # -- lookup ----------------------------------------------------------------------------
    @app.post("/v1/lookup", response_model=LookupOut, response_model_exclude_none=True, tags=["blocks"], responses=ERRORS,
              summary="Longest cached prefix of a chain, by token ids or by block hashes, with per-tier counts")
    async def lookup(body: LookupIn, request: Request, p: P):
        svc = svc_of(request)
        kwargs = dict(token_ids=body.token_ids, hashes=body.hashes, salt=body.salt, extra_keys=body.extra_keys,
                      return_keys=body.return_keys)
        if svc.store_is_local and (body.token_ids is None or len(body.token_ids) <= 65536):
            try:  # in memory, microseconds: no thread hop, unless the store's lock is taken right now
                return svc.lookup(p, body.model, wait=False, **kwargs)
            except WouldBlock:
                pass
        return await run_in_threadpool(lambda: svc.lookup(p, body.model, **kwargs))

    # -- blocks ----------------------------------------------------------------------------
    @app.put("/v1/blocks", response_model=PutOut, tags=["blocks"], responses=ERRORS,
             summary="Store a chain of blocks: the body is a msgpack stream of frames (application/x-kvtier-frames)",
             openapi_extra={"requestBody": {"required": True, "content": {wire.FRAMES_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_blocks(request: Request, p: P,
                         model: str = Query(max_length=64, description="model id from POST /v1/specs"),
                         parent: str | None = Query(None, pattern=HEX64, description="hash of the block before the first frame's")):
        svc = svc_of(request)
        svc.spec_of(p, model)  # 404 before the body is read
        if parent is not None:
            parse_client_key(parent, "parent")
        async with request.app.state.transfers:
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and 0 < int(declared) <= settings.max_request_bytes:
                # read into a pooled buffer of the declared size: no fresh pages per request
                n = int(declared)
                buf = svc.buffers.take(n)[0]
                try:
                    view, pos = buf.numpy(), 0
                    async for chunk in request.stream():
                        if pos + len(chunk) > n:
                            raise BadRequest(f"the body is longer than its Content-Length ({n})", field="body")
                        view[pos: pos + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                        pos += len(chunk)
                    items = wire.split_items(memoryview(view)[:pos], max_items=settings.max_blocks_per_request)
                    stored = await run_in_threadpool(svc.put_frames, p, model, items, parent)
                finally:
                    svc.buffers.give([buf])
            else:
                body = await request.body()
                items = wire.split_items(body, max_items=settings.max_blocks_per_request)
                stored = await run_in_threadpool(svc.put_frames, p, model, items, parent)
        return PutOut(stored=stored, num_stored=sum(stored))

    @app.post("/v1/blocks/get", tags=["blocks"], responses={**ERRORS, 200: {"content": {wire.FRAMES_MEDIA_TYPE: {}},
              "description": "a msgpack stream, one item per key in order: a frame (bin) or nil (a miss)"}},
              response_class=StreamingResponse, summary="Fetch blocks by hash: a streamed msgpack stream of frames, nil for a miss")
    async def get_blocks(body: KeysIn, request: Request, p: P):
        svc = svc_of(request)
        spec = svc.spec_of(p, body.model)
        ckeys = svc._client_keys(body.keys, "keys")
        group = max(1, GET_GROUP_BYTES // spec.block_nbytes)
        transfers = request.app.state.transfers

        def fetch(keys):
            # fresh tensors, not pooled ones: the event loop's transport may still hold a view of a
            # sent buffer after the response ends, so reusing it could change bytes not yet on the wire
            blocks = svc.get_checked(p, spec, keys)
            return [None if b is None else svc.encode_block_parts(spec, k, b) for k, b in zip(keys, blocks)]

        if len(ckeys) <= group:  # one group: fetch it first, answer with a Content-Length (no chunking copies)
            async with transfers:
                frames = await run_in_threadpool(fetch, ckeys)
            pieces = list(wire.encode_parts(frames))
            size = sum(len(x) if isinstance(x, bytes) else x.nbytes for x in pieces)
            return StreamingResponse(iter(pieces), media_type=wire.FRAMES_MEDIA_TYPE, headers={"content-length": str(size)})

        async def stream():
            async with transfers:
                for i in range(0, len(ckeys), group):
                    for piece in wire.encode_parts(await run_in_threadpool(fetch, ckeys[i: i + group])):
                        yield piece

        return StreamingResponse(stream(), media_type=wire.FRAMES_MEDIA_TYPE)

    @app.post("/v1/blocks/delete", response_model=DeleteOut, tags=["blocks"], responses=ERRORS,
              summary="Remove blocks from every tier")
    async def delete_blocks(body: KeysIn, request: Request, p: P):
        n = await run_in_threadpool(svc_of(request).delete, p, body.model, body.keys)
        return DeleteOut(removed=n)

    # -- retrieval and attention next to the data ------------------------------------------
    def query_route(path: str, model_in, model_out, summary: str, run):
        body_doc = {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model_in.__name__}"}},
            wire.MSGPACK_MEDIA_TYPE: {"schema": {"$ref": f"#/components/schemas/{model_in.__name__}"}}}}
        answer_doc = {200: {"description": "JSON, or msgpack (tensor data as bin) when the request is msgpack or accepts it",
                            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model_out.__name__}"}},
                                        wire.MSGPACK_MEDIA_TYPE: {}}}}

        @app.post(path, tags=["retrieval"], responses={**ERRORS, 409: {"model": ErrorOut}, **answer_doc}, summary=summary,
                  openapi_extra={"requestBody": body_doc}, name=path.rsplit("/", 1)[-1])
        async def route(request: Request, p: P):
            body, binary = await _query_body(request, model_in)
            svc = svc_of(request)
            fields = body.model_dump(exclude={"q"})
            async with request.app.state.transfers:  # they read blocks: bounded like the block transfers
                out = await run_in_threadpool(lambda: run(svc, p, fields, body.q.model_dump()))
            return _query_answer(out, binary or wire.MSGPACK_MEDIA_TYPE in request.headers.get("accept", ""))

        return route

    query_route("/v1/retrieve", RetrieveIn, RetrieveOut,
                "Top tokens of a cached chain for one decode query per layer; only the blocks holding them are read",
                lambda svc, p, f, q: svc.retrieve(p, f.pop("model"), q=q, **f))
    query_route("/v1/attention", AttentionIn, AttentionOut,
                "Decode attention next to the data: (o, lse) over the chain's cached tokens (all, or the budget's selection)",
                lambda svc, p, f, q: svc.attention(p, f.pop("model"), q=q, **f))

    def openapi_with_query_models():
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in (RetrieveIn, AttentionIn, RetrieveOut, AttentionOut):
                js = m.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[m.__name__] = js
        return app.openapi_schema

    app.openapi = openapi_with_query_models

    # -- pins ------------------------------------------------------------------------------
    @app.post("/v1/pins", response_model=PinOut, tags=["pins"], responses=ERRORS,
              summary="Pin cached blocks for ttl_s seconds (a lease): they are not evicted meanwhile")
    async def pin(body: PinIn, request: Request, p: P):
        info = await run_in_threadpool(svc_of(request).pin, p, body.model, body.keys, body.ttl_s)
        return PinOut(lease_id=info.id, ttl_s=body.ttl_s, num_pinned=info.num_pinned)

    @app.delete("/v1/pins/{lease_id}", tags=["pins"], responses=ERRORS, summary="End a lease early")
    async def unpin(request: Request, p: P, lease_id: int = Path(ge=1, le=2**62)) -> dict[str, bool]:
        await run_in_threadpool(svc_of(request).unpin, p, lease_id)
        return {"unpinned": True}

    # -- stats and events ------------------------------------------------------------------
    @app.get("/v1/stats", tags=["stats"], responses=ERRORS,
             summary="The caller's bytes and quota; with the admin key, every tier and tenant")
    async def stats(request: Request, p: P) -> dict[str, Any]:
        return await run_in_threadpool(svc_of(request).stats, p)

    @app.get("/v1/events", tags=["stats"], responses=ERRORS,
             summary="Stored/removed events with id > after (a tenant sees its own blocks, the admin all)")
    async def events(request: Request, p: P, after: int = Query(0, ge=0, le=2**62),
                     limit: int = Query(1000, ge=1, le=1_000_000)) -> dict[str, Any]:
        return await run_in_threadpool(svc_of(request).events, p, after, limit)

    return app
