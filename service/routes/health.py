"""``/healthz``, ``/readyz`` and ``/metrics`` (tag ``health``)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import Forbidden
from ..metrics import CONTENT_TYPE
from .deps import auth_of, settings_of, svc_of

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: every tier reachable and the disk not full (503, status degraded, otherwise)")
async def readyz(request: Request):
    ok, tiers = await run_in_threadpool(svc_of(request).readiness)
    return JSONResponse({"ready": ok, "status": "ok" if ok else "degraded", "tiers": tiers}, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request):
    settings = settings_of(request)
    if not settings.open_mode and settings.metrics_auth:
        p = auth_of(request).authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if not p.is_admin:
            raise Forbidden("/metrics needs the admin key (metrics_auth)", field="authorization")
    body = await run_in_threadpool(svc_of(request).metrics.render)
    return Response(body, media_type=CONTENT_TYPE)
