"""``/v1/retrieve`` and ``/v1/attention``: top tokens and decode attention next to the data (tag ``retrieval``).

Both take JSON or msgpack bodies (``query_body``), so their request models are not FastAPI body
parameters: ``install_query_schemas`` adds the models to the app's OpenAPI components, which the
routes' ``$ref``s name.
"""

import json
from collections.abc import Callable
from typing import Any

import msgpack
import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from .. import wire
from ..core import KVService
from ..errors import BadRequest, UnsupportedMediaType
from ..rest_models import ERRORS, AttentionIn, AttentionOut, ErrorOut, RetrieveIn, RetrieveOut
from ..tenancy import Principal
from .deps import Caller, svc_of, transfers_of

router = APIRouter(tags=["retrieval"])

QUERY_MODELS = (RetrieveIn, AttentionIn, RetrieveOut, AttentionOut)


async def query_body(request: Request, model_cls):
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


def query_answer(out: dict, binary: bool) -> Response:
    """The answer of /v1/retrieve or /v1/attention: tensors as {dtype, shape, data} (bin in msgpack, base64 in JSON)."""
    doc = {k: wire.tensor_to_wire(v, binary=binary) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    if binary:
        return Response(msgpack.packb(doc, use_bin_type=True), media_type=wire.MSGPACK_MEDIA_TYPE)
    return JSONResponse(doc)


def query_route(
    path: str,
    model_in: type[BaseModel],
    model_out: type[BaseModel],
    summary: str,
    run: Callable[[KVService, Principal, dict[str, Any], dict[str, Any]], dict],
):
    """Add ``POST path`` to the router: ``run(svc, caller, fields, q)`` answers a body of ``model_in`` with ``model_out``."""
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

    @router.post(
        path,
        responses={**ERRORS, 409: {"model": ErrorOut}, **answer_doc},
        summary=summary,
        openapi_extra={"requestBody": body_doc},
        name=path.rsplit("/", 1)[-1],
    )
    async def route(request: Request, p: Caller):
        body, binary = await query_body(request, model_in)
        svc = svc_of(request)
        fields = body.model_dump(exclude={"q"})
        async with transfers_of(request):  # they read blocks: bounded like the block transfers
            out = await run_in_threadpool(lambda: run(svc, p, fields, body.q.model_dump()))
        return query_answer(out, binary or wire.MSGPACK_MEDIA_TYPE in request.headers.get("accept", ""))

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


def install_query_schemas(app: FastAPI) -> None:
    """Make ``app.openapi()`` list the query models (``QUERY_MODELS``) that the retrieval routes' ``$ref``s name."""

    def openapi_with_query_models():
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in QUERY_MODELS:
                js = m.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[m.__name__] = js
        return app.openapi_schema

    app.openapi = openapi_with_query_models
