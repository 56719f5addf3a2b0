"""``/v1/specs``: register, list and unregister a model's KV spec (tag ``specs``)."""

from fastapi import APIRouter, Path, Request
from starlette.concurrency import run_in_threadpool

from ..limits import MAX_MODEL_CHARS
from ..rest_models import ERRORS, SpecIn, SpecOut
from .deps import Caller, svc_of

router = APIRouter(tags=["specs"])


@router.post(
    "/v1/specs",
    response_model=SpecOut,
    responses=ERRORS,
    summary="Register a model's KV spec; returns the model id to use in every other call",
)
async def register_spec(body: SpecIn, request: Request, p: Caller):
    model, spec = await run_in_threadpool(svc_of(request).register_spec, p, body.model_dump())
    return SpecOut(model=model, spec=spec.to_dict(), block_nbytes=spec.block_nbytes, block_shape=list(spec.block_shape))


@router.get("/v1/specs", responses=ERRORS, summary="The caller's registered specs")
async def list_specs(request: Request, p: Caller) -> dict[str, dict]:
    return {m: s.to_dict() for m, s in svc_of(request).registry.models_of(p.tenant).items()}


@router.delete(
    "/v1/specs/{model}",
    responses=ERRORS,
    summary="Unregister one of the caller's specs (its blocks become unreachable for the caller and age out)",
)
async def unregister_spec(request: Request, p: Caller, model: str = Path(max_length=MAX_MODEL_CHARS)) -> dict[str, bool]:
    await run_in_threadpool(svc_of(request).unregister_spec, p, model)
    return {"unregistered": True}
