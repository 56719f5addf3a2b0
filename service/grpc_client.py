"""Python SDK for the gRPC API: ``KVTierGrpcClient`` (sync) and ``AsyncKVTierGrpcClient`` (grpc.aio).

The same methods and return values as the REST clients (``service.client``), and the same argument
checks and answer decoding (``service.client_base``): blocks come back as
tensors in the spec's layout, every frame verified; transient failures (UNAVAILABLE) are retried
with exponential backoff; every call has a deadline; a refused call raises ``KVTierError`` with
the gRPC status name as its code and the field from the trailing metadata.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Sequence

import grpc
import torch

from kvtier.kvstore import KVSpec

from . import grpc_wire
from .client import AttentionState, KVTierError, Lookup, Retrieval, decode_items, encode_frame_list
from .client_base import ClientBase, answer_tensor, check_chain, query_tensor, token_list
from .proto import kvtier_pb2 as pb
from .proto import kvtier_pb2_grpc as pb_grpc

RETRY_CODES = (grpc.StatusCode.UNAVAILABLE,)
_STATUS = {
    "ABORTED": 409,
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 413,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def _options(max_message_bytes: int) -> list:
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]


def _error(e: grpc.RpcError) -> KVTierError:
    code = e.code().name if e.code() is not None else "UNKNOWN"
    field = None
    try:
        field = dict(e.trailing_metadata() or ()).get("kvtier-field")
    except Exception:
        pass
    return KVTierError(_STATUS.get(code, 500), code, e.details() or "", field)


def _b(k) -> bytes:
    return bytes.fromhex(k) if isinstance(k, str) else bytes(k)


def _spec_msg(spec: KVSpec) -> pb.Spec:
    return pb.Spec(
        model_id=spec.model_id,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=spec.dtype,
        block_tokens=spec.block_tokens,
    )


def _lookup_msg(model, token_ids, hashes, salt, extra_keys, return_keys) -> pb.LookupRequest:
    check_chain(token_ids, hashes)
    msg = pb.LookupRequest(model=model, salt=salt, extra_keys=list(extra_keys), return_keys=return_keys)
    if hashes is not None:
        msg.hashes.extend(_b(h) for h in hashes)
    else:
        msg.token_ids.extend(token_list(token_ids))
    return msg


def _lookup(r: pb.LookupReply) -> Lookup:
    return Lookup(
        r.model,
        r.num_blocks,
        r.num_tokens,
        r.num_requested_blocks,
        dict(r.tier_hits),
        dict(r.tier_prefix),
        list(r.keys) if r.keys else None,
    )


_SERVICE = pb.DESCRIPTOR.services_by_name["KVTier"].full_name


def _put_msgs(spec: KVSpec, model: str, keys: Sequence[bytes], blocks, parent) -> list[bytes]:
    """The ``PutRequest``s of a put as bytes (``grpc_wire``): each frame's header and block joined once."""
    return [
        grpc_wire.put_request(parts, model if i == 0 else "", _b(parent) if i == 0 and parent is not None else b"")
        for i, parts in enumerate(encode_frame_list(spec, keys, blocks))
    ]


def _block_methods(channel):
    """``PutBlocks`` and ``GetBlocks`` with ``grpc_wire``'s (de)serializers: requests sent as the bytes
    ``_put_msgs`` made, replies read as views of the received bytes (every other method: the stub's)."""
    put = channel.stream_unary(f"/{_SERVICE}/PutBlocks", request_serializer=None, response_deserializer=pb.PutReply.FromString)
    get = channel.unary_stream(
        f"/{_SERVICE}/GetBlocks", request_serializer=pb.KeysRequest.SerializeToString, response_deserializer=grpc_wire.parse_block_reply
    )
    return put, get


def _query_msg(model, q, budget, token_ids, hashes, salt, extra_keys, layers) -> pb.QueryRequest:
    w = query_tensor(q, token_ids, hashes)
    msg = pb.QueryRequest(
        model=model,
        salt=salt,
        extra_keys=list(extra_keys),
        budget=0 if budget is None else int(budget),
        q=pb.Tensor(dtype=w["dtype"], shape=w["shape"], data=w["data"]),
        layers=[] if layers is None else [int(x) for x in layers],
    )
    if hashes is not None:
        msg.hashes.extend(_b(h) for h in hashes)
    else:
        msg.token_ids.extend(token_list(token_ids))
    return msg


def _tensor(m: pb.Tensor, name: str) -> torch.Tensor:
    return answer_tensor({"dtype": m.dtype, "shape": [int(n) for n in m.shape], "data": m.data}, name)


def _retrieval(r: pb.RetrieveReply) -> Retrieval:
    return Retrieval(
        r.model,
        list(r.layers),
        r.budget,
        r.num_tokens,
        r.num_blocks,
        r.num_requested_blocks,
        _tensor(r.token_ids, "token_ids"),
        list(r.fetched),
        r.summarized,
    )


def _attention(r: pb.AttentionReply) -> AttentionState:
    return AttentionState(
        r.model,
        list(r.layers),
        r.budget or None,
        r.num_tokens,
        r.num_blocks,
        r.num_requested_blocks,
        r.attended,
        list(r.fetched),
        _tensor(r.o, "o"),
        _tensor(r.lse, "lse"),
    )


class _Base(ClientBase):
    def __init__(self, target: str, api_key: str | None, timeout: float, retries: int, backoff_s: float, max_message_bytes: int) -> None:
        super().__init__(timeout, retries, backoff_s)
        self.target = target
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.options = _options(max_message_bytes)


class KVTierGrpcClient(_Base):
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        max_message_bytes: int = 80 << 20,
        root_certificates: bytes | None = None,
        tls: bool = False,
    ) -> None:
        """``tls`` (or ``root_certificates``, the PEM of the CA to trust; default: the system's): a TLS channel."""
        super().__init__(target, api_key, timeout, retries, backoff_s, max_message_bytes)
        if tls or root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=self.options)
        else:
            self._channel = grpc.insecure_channel(target, options=self.options)
        self._stub = pb_grpc.KVTierStub(self._channel)
        self._put_blocks, self._get_blocks = _block_methods(self._channel)

    def _call(self, fn):
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES or attempt == self.retries:
                    raise _error(e) from None
            time.sleep(self._delay(attempt))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _unary(self, name: str, msg):
        method = getattr(self._stub, name)
        return self._call(lambda: method(msg, timeout=self.timeout, metadata=self.metadata))

    def health(self) -> dict:
        r = self._unary("Health", pb.HealthRequest())
        return {"ready": r.ready, "tiers": dict(r.tiers)}

    def register_spec(self, spec: KVSpec) -> str:
        model = self._unary("RegisterSpec", _spec_msg(spec)).model
        self._specs[model] = spec
        return model

    def spec(self, model: str) -> KVSpec:
        if model not in self._specs:
            raise KVTierError(404, "NOT_FOUND", f"register the spec of {model!r} with this client first", "model")
        return self._specs[model]

    def lookup(
        self, model: str, *, token_ids=None, hashes=None, salt: str = "", extra_keys: Sequence[str] = (), return_keys: bool = False
    ) -> Lookup:
        return _lookup(self._unary("Lookup", _lookup_msg(model, token_ids, hashes, salt, extra_keys, return_keys)))

    def hashes(self, model: str, token_ids, *, salt: str = "", extra_keys: Sequence[str] = ()) -> list[bytes]:
        return self.lookup(model, token_ids=token_ids, salt=salt, extra_keys=extra_keys, return_keys=True).keys or []

    def unregister_spec(self, model: str) -> bool:
        """Withdraw this tenant's registration of ``model`` (NOT_FOUND unless it has one)."""
        self._specs.pop(model, None)
        return self._unary("UnregisterSpec", pb.UnregisterRequest(model=model)).unregistered

    def put(self, model: str, keys: Sequence[bytes], blocks, *, parent: bytes | None = None) -> list[bool]:
        msgs = _put_msgs(self.spec(model), model, keys, blocks, parent)
        reply = self._call(lambda: self._put_blocks(iter(msgs), timeout=self.timeout, metadata=self.metadata))
        return list(reply.stored)

    def get(self, model: str, keys: Sequence[bytes], out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        """Blocks ``[L, 2, H_kv, T, D]`` per key (None: a miss); with ``out``, copied into those buffers."""
        msg = pb.KeysRequest(model=model, keys=[_b(k) for k in keys])
        replies = self._call(lambda: list(self._get_blocks(msg, timeout=self.timeout, metadata=self.metadata)))
        return decode_items(self.spec(model), keys, [r.frame if r.found else None for r in replies], out)

    def retrieve(
        self,
        model: str,
        q: torch.Tensor,
        budget: int,
        *,
        token_ids=None,
        hashes=None,
        salt: str = "",
        extra_keys: Sequence[str] = (),
        layers: Sequence[int] | None = None,
    ) -> Retrieval:
        return _retrieval(self._unary("Retrieve", _query_msg(model, q, budget, token_ids, hashes, salt, extra_keys, layers)))

    def attention(
        self,
        model: str,
        q: torch.Tensor,
        *,
        budget: int | None = None,
        token_ids=None,
        hashes=None,
        salt: str = "",
        extra_keys: Sequence[str] = (),
        layers: Sequence[int] | None = None,
    ) -> AttentionState:
        return _attention(self._unary("Attention", _query_msg(model, q, budget, token_ids, hashes, salt, extra_keys, layers)))

    def delete(self, model: str, keys: Sequence[bytes]) -> int:
        return self._unary("DeleteBlocks", pb.KeysRequest(model=model, keys=[_b(k) for k in keys])).removed

    def pin(self, model: str, keys: Sequence[bytes], ttl_s: float) -> dict:
        r = self._unary("Pin", pb.PinRequest(model=model, keys=[_b(k) for k in keys], ttl_s=ttl_s))
        return {"lease_id": r.lease_id, "ttl_s": r.ttl_s, "num_pinned": r.num_pinned}

    def unpin(self, lease_id: int) -> bool:
        return self._unary("Unpin", pb.UnpinRequest(lease_id=lease_id)).unpinned

    def stats(self) -> dict:
        return json.loads(self._unary("Stats", pb.StatsRequest()).json)

    def events(self, after: int = 0, limit: int = 1000) -> dict:
        return json.loads(self._unary("Events", pb.EventsRequest(after=after, limit=limit)).json)


class AsyncKVTierGrpcClient(_Base):
    """grpc.aio client; create and use it inside one running event loop."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        max_message_bytes: int = 80 << 20,
        root_certificates: bytes | None = None,
        tls: bool = False,
    ) -> None:
        """``tls`` (or ``root_certificates``, the PEM of the CA to trust; default: the system's): a TLS channel."""
        super().__init__(target, api_key, timeout, retries, backoff_s, max_message_bytes)
        if tls or root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.aio.secure_channel(target, creds, options=self.options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=self.options)
        self._stub = pb_grpc.KVTierStub(self._channel)
        self._put_blocks, self._get_blocks = _block_methods(self._channel)

    async def _call(self, fn):
        for attempt in range(self.retries + 1):
            try:
                return await fn()
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES or attempt == self.retries:
                    raise _error(e) from None
            await asyncio.sleep(self._delay(attempt))

    async def aclose(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def _unary(self, name: str, msg):
        method = getattr(self._stub, name)
        return await self._call(lambda: method(msg, timeout=self.timeout, metadata=self.metadata))

    async def register_spec(self, spec: KVSpec) -> str:
        model = (await self._unary("RegisterSpec", _spec_msg(spec))).model
        self._specs[model] = spec
        return model

    def spec(self, model: str) -> KVSpec:
        if model not in self._specs:
            raise KVTierError(404, "NOT_FOUND", f"register the spec of {model!r} with this client first", "model")
        return self._specs[model]

    async def lookup(
        self, model: str, *, token_ids=None, hashes=None, salt: str = "", extra_keys: Sequence[str] = (), return_keys: bool = False
    ) -> Lookup:
        return _lookup(await self._unary("Lookup", _lookup_msg(model, token_ids, hashes, salt, extra_keys, return_keys)))

    async def hashes(self, model: str, token_ids, *, salt: str = "", extra_keys: Sequence[str] = ()) -> list[bytes]:
        return (await self.lookup(model, token_ids=token_ids, salt=salt, extra_keys=extra_keys, return_keys=True)).keys or []

    async def put(self, model: str, keys: Sequence[bytes], blocks, *, parent: bytes | None = None) -> list[bool]:
        msgs = _put_msgs(self.spec(model), model, keys, blocks, parent)

        async def send():
            return await self._put_blocks(iter(msgs), timeout=self.timeout, metadata=self.metadata)

        return list((await self._call(send)).stored)

    async def get(self, model: str, keys: Sequence[bytes], out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        msg = pb.KeysRequest(model=model, keys=[_b(k) for k in keys])

        async def fetch():
            return [r async for r in self._get_blocks(msg, timeout=self.timeout, metadata=self.metadata)]

        replies = await self._call(fetch)
        return decode_items(self.spec(model), keys, [r.frame if r.found else None for r in replies], out)

    async def retrieve(
        self,
        model: str,
        q: torch.Tensor,
        budget: int,
        *,
        token_ids=None,
        hashes=None,
        salt: str = "",
        extra_keys: Sequence[str] = (),
        layers: Sequence[int] | None = None,
    ) -> Retrieval:
        msg = _query_msg(model, q, budget, token_ids, hashes, salt, extra_keys, layers)
        return _retrieval(await self._unary("Retrieve", msg))

    async def attention(
        self,
        model: str,
        q: torch.Tensor,
        *,
        budget: int | None = None,
        token_ids=None,
        hashes=None,
        salt: str = "",
        extra_keys: Sequence[str] = (),
        layers: Sequence[int] | None = None,
    ) -> AttentionState:
        msg = _query_msg(model, q, budget, token_ids, hashes, salt, extra_keys, layers)
        return _attention(await self._unary("Attention", msg))

    async def delete(self, model: str, keys: Sequence[bytes]) -> int:
        return (await self._unary("DeleteBlocks", pb.KeysRequest(model=model, keys=[_b(k) for k in keys]))).removed

    async def pin(self, model: str, keys: Sequence[bytes], ttl_s: float) -> dict:
        r = await self._unary("Pin", pb.PinRequest(model=model, keys=[_b(k) for k in keys], ttl_s=ttl_s))
        return {"lease_id": r.lease_id, "ttl_s": r.ttl_s, "num_pinned": r.num_pinned}

    async def unpin(self, lease_id: int) -> bool:
        return (await self._unary("Unpin", pb.UnpinRequest(lease_id=lease_id))).unpinned

    async def stats(self) -> dict:
        return json.loads((await self._unary("Stats", pb.StatsRequest())).json)

    async def events(self, after: int = 0, limit: int = 1000) -> dict:
        return json.loads((await self._unary("Events", pb.EventsRequest(after=after, limit=limit))).json)
