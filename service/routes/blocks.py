"""``/v1/lookup`` and ``/v1/blocks``: longest cached prefix, and put/get/delete of blocks as msgpack frames (tag ``blocks``).

``POST /v1/lookup`` is usually answered before it gets here, by the fast path (``rest_middleware.FastLookup``);
this route answers what the fast path hands on.
"""

from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import wire
from ..core import WouldBlock, parse_client_key
from ..errors import BadRequest
from ..limits import MAX_MODEL_CHARS
from ..rest_models import ERRORS, HEX64, DeleteOut, KeysIn, LookupIn, LookupOut, PutOut
from .deps import Caller, settings_of, svc_of, transfers_of

GET_GROUP_BYTES = 32 << 20  # a streamed get fetches this many bytes of blocks at a time

router = APIRouter(tags=["blocks"])


# -- lookup ----------------------------------------------------------------------------------
@router.post(
    "/v1/lookup",
    response_model=LookupOut,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Longest cached prefix of a chain, by token ids or by block hashes, with per-tier counts",
)
async def lookup(body: LookupIn, request: Request, p: Caller):
    svc = svc_of(request)
    kwargs: dict[str, Any] = dict(
        token_ids=body.token_ids, hashes=body.hashes, salt=body.salt, extra_keys=body.extra_keys, return_keys=body.return_keys
    )
    if svc.store_is_local and (body.token_ids is None or len(body.token_ids) <= 65536):
        try:  # in memory, microseconds: no thread hop, unless the store's lock is taken right now
            return svc.lookup(p, body.model, wait=False, **kwargs)
        except WouldBlock:
            pass
    return await run_in_threadpool(lambda: svc.lookup(p, body.model, **kwargs))


# -- blocks ----------------------------------------------------------------------------------
@router.put(
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
    p: Caller,
    model: str = Query(max_length=MAX_MODEL_CHARS, description="model id from POST /v1/specs"),
    parent: str | None = Query(None, pattern=HEX64, description="hash of the block before the first frame's"),
):
    svc, settings = svc_of(request), settings_of(request)
    svc.spec_of(p, model)  # 404 before the body is read
    if parent is not None:
        parse_client_key(parent, "parent")
    async with transfers_of(request):
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


@router.post(
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
async def get_blocks(body: KeysIn, request: Request, p: Caller):
    svc = svc_of(request)
    spec = svc.spec_of(p, body.model)
    ckeys = svc._client_keys(body.keys, "keys")
    group = max(1, GET_GROUP_BYTES // spec.block_nbytes)
    transfers = transfers_of(request)

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


@router.post("/v1/blocks/delete", response_model=DeleteOut, responses=ERRORS, summary="Remove blocks from every tier")
async def delete_blocks(body: KeysIn, request: Request, p: Caller):
    n = await run_in_threadpool(svc_of(request).delete, p, body.model, body.keys)
    return DeleteOut(removed=n)
