"""``/v1/stats`` and ``/v1/events`` (tag ``stats``)."""

from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from ..rest_models import ERRORS
from .deps import Caller, svc_of

router = APIRouter(tags=["stats"])


@router.get("/v1/stats", responses=ERRORS, summary="The caller's bytes and quota; with the admin key, every tier and tenant")
async def stats(request: Request, p: Caller) -> dict[str, Any]:
    return await run_in_threadpool(svc_of(request).stats, p)


@router.get("/v1/events", responses=ERRORS, summary="Stored/removed events with id > after (a tenant sees its own blocks, the admin all)")
async def events(
    request: Request, p: Caller, after: int = Query(0, ge=0, le=2**62), limit: int = Query(1000, ge=1, le=1_000_000)
) -> dict[str, Any]:
    return await run_in_threadpool(svc_of(request).events, p, after, limit)
