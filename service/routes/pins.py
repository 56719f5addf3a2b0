"""``/v1/pins``: leases that keep cached blocks from eviction (tag ``pins``)."""

from fastapi import APIRouter, Path, Request
from starlette.concurrency import run_in_threadpool

from ..rest_models import ERRORS, PinIn, PinOut
from .deps import Caller, svc_of

router = APIRouter(tags=["pins"])


@router.post(
    "/v1/pins",
    response_model=PinOut,
    responses=ERRORS,
    summary="Pin cached blocks for ttl_s seconds (a lease): they are not evicted meanwhile",
)
async def pin(body: PinIn, request: Request, p: Caller):
    info = await run_in_threadpool(svc_of(request).pin, p, body.model, body.keys, body.ttl_s)
    return PinOut(lease_id=info.id, ttl_s=body.ttl_s, num_pinned=info.num_pinned)


@router.delete("/v1/pins/{lease_id}", responses=ERRORS, summary="End a lease early")
async def unpin(request: Request, p: Caller, lease_id: int = Path(ge=1, le=2**62)) -> dict[str, bool]:
    await run_in_threadpool(svc_of(request).unpin, p, lease_id)
    return {"unpinned": True}
