"""The REST API (FastAPI): ``create_app(settings)``; OpenAPI at ``/docs`` and ``/openapi.json``.

The app is assembled here (lifespan, error handlers, middleware); the routes live in ``routes/``, one
module and router per OpenAPI tag. Every route is a thin shell over ``KVService`` (``service.core``),
which validates and raises ``ServiceError`` for a caller's mistake; here those become ``{"error":
{"code", "message", "field"}}`` with their 4xx status, and so do FastAPI's own validation errors
(422, the field is the path of the offending value). Bodies are bounded before they are read
(``BodyLimit``). Blocking work (disk, Redis, copying megabytes) runs in worker threads.
"""

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .connections import RequestGuard, TransportStats
from .core import KVService, open_service
from .errors import ServiceError
from .limits import RateLimited, TenantRateLimiter
from .metrics import Metrics
from .rest_middleware import BodyLimit, CatchAll, FastLookup, Observe
from .routes import ROUTERS
from .routes.retrieval import install_query_schemas
from .settings import Settings
from .tenancy import Authenticator

log = logging.getLogger("kvtier.rest")


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

    # what the routes read (routes.deps): the settings and authenticator here, the service and transfers from the lifespan
    app.state.settings = settings
    app.state.auth = auth
    for router in ROUTERS:  # one per OpenAPI tag (routes/<tag>.py)
        app.include_router(router)
    install_query_schemas(app)
    return app
