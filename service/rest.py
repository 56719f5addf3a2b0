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
from contextlib import asynccontextmanager
from typing import Annotated, Any

import msgpack
import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import wire
from .connections import RequestGuard, TransportStats
from .core import KVService, WouldBlock, open_service, parse_client_key
from .errors import BadRequest, Forbidden, ServiceError, UnsupportedMediaType
from .limits import MAX_MODEL_CHARS, RateLimited, TenantRateLimiter
from .metrics import CONTENT_TYPE, Metrics
from .settings import Settings
from .tenancy import Authenticator, Principal
from .rest_middleware import BodyLimit, CatchAll, FastLookup, Observe
from .rest_models import (
    ERRORS,
    HEX64,
    AttentionIn,
    AttentionOut,
    DeleteOut,
    ErrorOut,
    KeysIn,
    LookupIn,
    LookupOut,
    PinIn,
    PinOut,
    PutOut,
    RetrieveIn,
    RetrieveOut,
    SpecIn,
    SpecOut,
)

log = logging.getLogger("kvtier.rest")

GET_GROUP_BYTES = 32 << 20  # a streamed get fetches this many bytes of blocks at a time


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
        except RecursionError:
            raise BadRequest("the body nests deeper than the JSON parser allows", field="body") from None
        binary = False
    else:
        raise UnsupportedMediaType(
            f"the body must be application/json or {wire.MSGPACK_MEDIA_TYPE}, got {ctype!r}"[:300], field="content-type"
        )
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

    transport_stats = TransportStats()  # what the connection and request guards refused (for /metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = service or await run_in_threadpool(open_service, settings, Metrics)
        svc.transport_stats = transport_stats
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
                from .grpc_server import stop_grpc_server

                await run_in_threadpool(stop_grpc_server, grpc_server, settings.graceful_shutdown_s)
            if service is None:
                await run_in_threadpool(svc.close)
            log.info("kvtier stopped: store closed")

    app = FastAPI(
        title="kvtier",
        version="1",
        lifespan=lifespan,
        description="KV-cache tier: longest-prefix lookup, block put/get/delete as msgpack frames, pins, stats, events. "
        "Block bodies are msgpack streams of `bin` items (one frame each) or `nil` (a miss).",
    )
    app.add_middleware(BodyLimit, settings=settings)

    # -- errors: every caller mistake is a 4xx naming the field -------------------------------
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        headers = {"retry-after": TenantRateLimiter.retry_after_header(e)} if isinstance(e, RateLimited) else None
        return JSONResponse(e.to_dict(), status_code=e.status, headers=headers)

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

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, e: ClientDisconnect):  # the client left mid-request: not our error, not a 500
        log.debug("client went away during %s %s", request.method, request.url.path)
        return _error(499, "client_closed", "the client closed the connection before the request was read", None)

    # -- metrics of every request (pure ASGI: no extra task per request) ---------------------
    app.add_middleware(FastLookup, settings=settings, auth=auth)
    app.state.transport_stats = transport_stats
    app.add_middleware(RequestGuard, settings=settings, stats=transport_stats)  # the request cap (health exempt) and the body read timeout
    app.add_middleware(CatchAll)  # a bug is a 500 logged at most every few seconds, never a re-raised traceback
    app.add_middleware(Observe)

    async def principal(
        request: Request, _bearer: HTTPAuthorizationCredentials | None = Depends(bearer), _key: str | None = Depends(api_key_header)
    ) -> Principal:
        # the security dependencies only document the two headers in OpenAPI; the raw headers decide
        return svc_of(request).admit(auth.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key")))

    P = Annotated[Principal, Depends(principal)]

    def svc_of(request: Request) -> KVService:
        return request.app.state.svc

    # one router per OpenAPI tag, included below in this order
    routes = {tag: APIRouter(tags=[tag]) for tag in ("health", "specs", "blocks", "retrieval", "pins", "stats")}

    # -- health ----------------------------------------------------------------------------
    @routes["health"].get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @routes["health"].get("/readyz", summary="Readiness: every tier reachable and the disk not full (503, status degraded, otherwise)")
    async def readyz(request: Request):
        ok, tiers = await run_in_threadpool(svc_of(request).readiness)
        return JSONResponse({"ready": ok, "status": "ok" if ok else "degraded", "tiers": tiers}, status_code=200 if ok else 503)

    @routes["health"].get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request):
        if not settings.open_mode and settings.metrics_auth:
            p = auth.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
            if not p.is_admin:
                raise Forbidden("/metrics needs the admin key (metrics_auth)", field="authorization")
        body = await run_in_threadpool(svc_of(request).metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    # -- specs -----------------------------------------------------------------------------
    @routes["specs"].post(
        "/v1/specs",
        response_model=SpecOut,
        responses=ERRORS,
        summary="Register a model's KV spec; returns the model id to use in every other call",
    )
    async def register_spec(body: SpecIn, request: Request, p: P):
        model, spec = await run_in_threadpool(svc_of(request).register_spec, p, body.model_dump())
        return SpecOut(model=model, spec=spec.to_dict(), block_nbytes=spec.block_nbytes, block_shape=list(spec.block_shape))

    @routes["specs"].get("/v1/specs", responses=ERRORS, summary="The caller's registered specs")
    async def list_specs(request: Request, p: P) -> dict[str, dict]:
        return {m: s.to_dict() for m, s in svc_of(request).registry.models_of(p.tenant).items()}

    @routes["specs"].delete(
        "/v1/specs/{model}",
        responses=ERRORS,
        summary="Unregister one of the caller's specs (its blocks become unreachable for the caller and age out)",
    )
    async def unregister_spec(request: Request, p: P, model: str = Path(max_length=MAX_MODEL_CHARS)) -> dict[str, bool]:
        await run_in_threadpool(svc_of(request).unregister_spec, p, model)
        return {"unregistered": True}

    # -- lookup ----------------------------------------------------------------------------
    @routes["blocks"].post(
        "/v1/lookup",
        response_model=LookupOut,
        response_model_exclude_none=True,
        responses=ERRORS,
        summary="Longest cached prefix of a chain, by token ids or by block hashes, with per-tier counts",
    )
    async def lookup(body: LookupIn, request: Request, p: P):
        svc = svc_of(request)
        kwargs = dict(
            token_ids=body.token_ids, hashes=body.hashes, salt=body.salt, extra_keys=body.extra_keys, return_keys=body.return_keys
        )
        if svc.store_is_local and (body.token_ids is None or len(body.token_ids) <= 65536):
            try:  # in memory, microseconds: no thread hop, unless the store's lock is taken right now
                return svc.lookup(p, body.model, wait=False, **kwargs)
            except WouldBlock:
                pass
        return await run_in_threadpool(lambda: svc.lookup(p, body.model, **kwargs))

    # -- blocks ----------------------------------------------------------------------------
    @routes["blocks"].put(
        "/v1/blocks",
        response_model=PutOut,
        responses=ERRORS,
        summary="Store a chain of blocks: the body is a msgpack stream of frames (application/x-kvtier-frames)",
        openapi_extra={
            "requestBody": {"required": True, "content": {wire.FRAMES_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}
        },
    )
    async def put_blocks(
        request: Request,
        p: P,
        model: str = Query(max_length=MAX_MODEL_CHARS, description="model id from POST /v1/specs"),
        parent: str | None = Query(None, pattern=HEX64, description="hash of the block before the first frame's"),
    ):
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
                        view[pos : pos + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
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

    @routes["blocks"].post(
        "/v1/blocks/get",
        responses={
            **ERRORS,
            200: {
                "content": {wire.FRAMES_MEDIA_TYPE: {}},
                "description": "a msgpack stream, one item per key in order: a frame (bin) or nil (a miss)",
            },
        },
        response_class=StreamingResponse,
        summary="Fetch blocks by hash: a streamed msgpack stream of frames, nil for a miss",
    )
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
                    for piece in wire.encode_parts(await run_in_threadpool(fetch, ckeys[i : i + group])):
                        yield piece

        return StreamingResponse(stream(), media_type=wire.FRAMES_MEDIA_TYPE)

    @routes["blocks"].post("/v1/blocks/delete", response_model=DeleteOut, responses=ERRORS, summary="Remove blocks from every tier")
    async def delete_blocks(body: KeysIn, request: Request, p: P):
        n = await run_in_threadpool(svc_of(request).delete, p, body.model, body.keys)
        return DeleteOut(removed=n)

    # -- retrieval and attention next to the data ------------------------------------------
    def query_route(path: str, model_in, model_out, summary: str, run):
        body_doc = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model_in.__name__}"}},
                wire.MSGPACK_MEDIA_TYPE: {"schema": {"$ref": f"#/components/schemas/{model_in.__name__}"}},
            },
        }
        answer_doc = {
            200: {
                "description": "JSON, or msgpack (tensor data as bin) when the request is msgpack or accepts it",
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model_out.__name__}"}},
                    wire.MSGPACK_MEDIA_TYPE: {},
                },
            }
        }

        @routes["retrieval"].post(
            path,
            responses={**ERRORS, 409: {"model": ErrorOut}, **answer_doc},
            summary=summary,
            openapi_extra={"requestBody": body_doc},
            name=path.rsplit("/", 1)[-1],
        )
        async def route(request: Request, p: P):
            body, binary = await _query_body(request, model_in)
            svc = svc_of(request)
            fields = body.model_dump(exclude={"q"})
            async with request.app.state.transfers:  # they read blocks: bounded like the block transfers
                out = await run_in_threadpool(lambda: run(svc, p, fields, body.q.model_dump()))
            return _query_answer(out, binary or wire.MSGPACK_MEDIA_TYPE in request.headers.get("accept", ""))

        return route

    query_route(
        "/v1/retrieve",
        RetrieveIn,
        RetrieveOut,
        "Top tokens of a cached chain for one decode query per layer; only the blocks holding them are read",
        lambda svc, p, f, q: svc.retrieve(p, f.pop("model"), q=q, **f),
    )
    query_route(
        "/v1/attention",
        AttentionIn,
        AttentionOut,
        "Decode attention next to the data: (o, lse) over the chain's cached tokens (all, or the budget's selection)",
        lambda svc, p, f, q: svc.attention(p, f.pop("model"), q=q, **f),
    )

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
    @routes["pins"].post(
        "/v1/pins",
        response_model=PinOut,
        responses=ERRORS,
        summary="Pin cached blocks for ttl_s seconds (a lease): they are not evicted meanwhile",
    )
    async def pin(body: PinIn, request: Request, p: P):
        info = await run_in_threadpool(svc_of(request).pin, p, body.model, body.keys, body.ttl_s)
        return PinOut(lease_id=info.id, ttl_s=body.ttl_s, num_pinned=info.num_pinned)

    @routes["pins"].delete("/v1/pins/{lease_id}", responses=ERRORS, summary="End a lease early")
    async def unpin(request: Request, p: P, lease_id: int = Path(ge=1, le=2**62)) -> dict[str, bool]:
        await run_in_threadpool(svc_of(request).unpin, p, lease_id)
        return {"unpinned": True}

    # -- stats and events ------------------------------------------------------------------
    @routes["stats"].get("/v1/stats", responses=ERRORS, summary="The caller's bytes and quota; with the admin key, every tier and tenant")
    async def stats(request: Request, p: P) -> dict[str, Any]:
        return await run_in_threadpool(svc_of(request).stats, p)

    @routes["stats"].get(
        "/v1/events", responses=ERRORS, summary="Stored/removed events with id > after (a tenant sees its own blocks, the admin all)"
    )
    async def events(
        request: Request, p: P, after: int = Query(0, ge=0, le=2**62), limit: int = Query(1000, ge=1, le=1_000_000)
    ) -> dict[str, Any]:
        return await run_in_threadpool(svc_of(request).events, p, after, limit)

    for router in routes.values():
        app.include_router(router)
    return app
