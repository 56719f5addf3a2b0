"""Python SDK for the REST API: ``KVTierClient`` (sync) and ``AsyncKVTierClient`` (asyncio).

Both speak the same protocol (the request building and answer parsing below are shared; only the
I/O differs; what the gRPC clients share with them is in ``client_base``), retry transient failures (connection errors, 502/503/504) with exponential
backoff, bound every call with a timeout, and return blocks as tensors in the spec's layout
``[num_layers, 2, num_kv_heads, block_tokens, head_dim]``. Every frame received is verified
(checksum, the key asked for, the spec); a bad one raises ``FrameError`` rather than hand back
wrong KV. A 4xx raises ``KVTierError`` with the server's code, message and field.

    >>> c = KVTierClient("http://127.0.0.1:8080", api_key="...")
    >>> model = c.register_spec(KVSpec("llama", 32, 8, 128, "float16", 256))
    >>> keys = c.hashes(model, token_ids)            # the chain's block hashes under your tenant
    >>> c.put(model, keys, blocks)                   # blocks: [N, L, 2, H_kv, T, D] or a list
    >>> c.lookup(model, token_ids=token_ids).num_blocks
    >>> c.get(model, keys)                           # list of tensors (None: a miss)
    >>> c.retrieve(model, q, budget=256, hashes=keys).token_ids   # q [L, H_q, D] -> [L, H_kv, 256], -1 padding
    >>> st = c.attention(model, q, hashes=keys)      # st.o [L, H_q, D], st.lse [L, H_q]: merge_states with the local part
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import httpx
import msgpack
import torch

from kvtier.kvstore import FrameError, KVSpec, decode_frame, get_codec
from kvtier.kvstore.codecs.base import tensor_bytes, tensor_from_bytes
from kvtier.kvstore.frames import encode_frame_parts

from . import wire
from .client_base import ClientBase, answer_tensor, query_tensor, token_list
from .errors import ServiceError

RETRY_STATUS = (502, 503, 504)


class KVTierError(Exception):
    """The server refused a request (4xx) or failed (5xx after the retries)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass(frozen=True)
class Lookup:
    model: str
    num_blocks: int
    num_tokens: int
    num_requested_blocks: int
    tier_hits: dict[str, int]
    tier_prefix: dict[str, int]
    keys: list[bytes] | None = None


@dataclass(frozen=True)
class Retrieval:
    """The answer of ``retrieve``: the selected token ids per layer and KV head, and the blocks read."""

    model: str
    layers: list[int]
    budget: int
    num_tokens: int  # tokens of the cached prefix searched (0: nothing cached for this tenant)
    num_blocks: int
    num_requested_blocks: int
    token_ids: torch.Tensor  # int64 [L_q, H_kv, budget], positions in the sequence, ascending, -1 padding
    fetched: list[int]  # chain positions of the blocks read
    summarized: int


@dataclass(frozen=True)
class AttentionState:
    """The answer of ``attention``: ``(o, lse)`` over the chain's cached tokens, to merge with the local part."""

    model: str
    layers: list[int]
    budget: int | None
    num_tokens: int  # tokens of the cached prefix (0: o = 0, lse = -inf)
    num_blocks: int
    num_requested_blocks: int
    attended: int
    fetched: list[int]
    o: torch.Tensor  # float32 [L_q, H_q, D]
    lse: torch.Tensor  # float32 [L_q, H_q], natural log


# -- the protocol, shared by both clients ----------------------------------------------------
def _key_hex(k: bytes | str) -> str:
    return k if isinstance(k, str) else bytes(k).hex()


def _spec_body(spec: KVSpec) -> dict:
    return spec.to_dict()


def _lookup_body(model, token_ids, hashes, salt, extra_keys, return_keys) -> dict:
    # not check_chain: the server answers neither or both with a 400 naming the field
    body: dict[str, Any] = {"model": model, "salt": salt, "extra_keys": list(extra_keys), "return_keys": return_keys}
    if token_ids is not None:
        body["token_ids"] = token_list(token_ids)
    if hashes is not None:
        body["hashes"] = [_key_hex(h) for h in hashes]
    return body


def _parse_lookup(d: dict) -> Lookup:
    keys = [bytes.fromhex(k) for k in d["keys"]] if d.get("keys") is not None else None
    return Lookup(d["model"], d["num_blocks"], d["num_tokens"], d["num_requested_blocks"], d["tier_hits"], d["tier_prefix"], keys)


def _query_body(model, q, budget, token_ids, hashes, salt, extra_keys, layers) -> dict:
    """The msgpack body of /v1/retrieve and /v1/attention (q's elements as bin)."""
    body: dict[str, Any] = {"model": model, "q": query_tensor(q, token_ids, hashes), "salt": salt, "extra_keys": list(extra_keys)}
    if budget is not None:
        body["budget"] = int(budget)
    if layers is not None:
        body["layers"] = [int(x) for x in layers]
    if token_ids is not None:
        body["token_ids"] = token_list(token_ids)
    else:
        body["hashes"] = [_key_hex(h) for h in hashes]
    return body


def _answer_tensor(d: dict, name: str) -> torch.Tensor:
    try:
        obj = d[name]
    except KeyError as e:
        raise FrameError(f"the answer's {name} is not a tensor: {e}") from None
    return answer_tensor(obj, name)


def _parse_retrieval(d: dict) -> Retrieval:
    return Retrieval(
        d["model"],
        d["layers"],
        d["budget"],
        d["num_tokens"],
        d["num_blocks"],
        d["num_requested_blocks"],
        _answer_tensor(d, "token_ids"),
        d["fetched"],
        d["summarized"],
    )


def _parse_attention(d: dict) -> AttentionState:
    return AttentionState(
        d["model"],
        d["layers"],
        d["budget"],
        d["num_tokens"],
        d["num_blocks"],
        d["num_requested_blocks"],
        d["attended"],
        d["fetched"],
        _answer_tensor(d, "o"),
        _answer_tensor(d, "lse"),
    )


_MSGPACK_HEADERS = {"content-type": wire.MSGPACK_MEDIA_TYPE, "accept": wire.MSGPACK_MEDIA_TYPE}


def _msgpack_answer(resp: httpx.Response) -> dict:
    try:
        return msgpack.unpackb(resp.content, raw=False)
    except Exception as e:
        raise FrameError(f"the answer is not msgpack: {type(e).__name__}") from None


def block_list(spec: KVSpec, keys: Sequence[bytes], blocks) -> list[torch.Tensor]:
    """A put's blocks, one per key, each checked against ``spec`` (ValueError otherwise). ``blocks`` is
    ``[N, L, 2, H_kv, T, D]`` or a list of blocks ``[L, 2, H_kv, T, D]``."""
    if isinstance(blocks, torch.Tensor):
        blocks = list(blocks.unbind(0)) if blocks.dim() == len(spec.block_shape) + 1 else [blocks]
    if len(blocks) != len(keys):
        raise ValueError(f"put needs one block per key: got {len(keys)} keys and {len(blocks)} blocks")
    for b in blocks:
        spec.check_block(b)
    return list(blocks)


def encode_frame_list(spec: KVSpec, keys: Sequence[bytes], blocks) -> list[tuple[bytes, memoryview]]:
    """One frame per block (identity codec) as (header, payload view) pairs: the blocks are not copied.

    ``blocks`` is ``[N, L, 2, H_kv, T, D]`` or a list of blocks ``[L, 2, H_kv, T, D]`` (CPU or CUDA).
    """
    frames = []
    for k, b in zip(keys, block_list(spec, keys, blocks)):
        k = bytes.fromhex(k) if isinstance(k, str) else bytes(k)
        frames.append(
            encode_frame_parts(k, spec, "identity", {}, spec.block_shape, spec.dtype, tensor_bytes(b.detach().cpu().contiguous()))
        )
    return frames


def encode_frames(spec: KVSpec, keys: Sequence[bytes], blocks) -> list[bytes]:
    """One frame per block, each as bytes (gRPC sends one per message)."""
    return [b"".join(parts) for parts in encode_frame_list(spec, keys, blocks)]


def encode_blocks(spec: KVSpec, keys: Sequence[bytes], blocks) -> list[bytes | memoryview]:
    """The body of a REST put: the msgpack stream of the frames, as a list of pieces (no join, no copy)."""
    return list(wire.encode_parts(encode_frame_list(spec, keys, blocks)))


def _returned_keys(found: Lookup) -> list[bytes]:
    """The chain's block hashes a lookup with ``return_keys=True`` answered."""
    if found.keys is None:
        raise RuntimeError("the server answered a lookup with return_keys=True without its keys")
    return found.keys


def _body(pieces: list) -> tuple[dict, list]:
    size = sum(len(x) if isinstance(x, bytes) else x.nbytes for x in pieces)
    return {"content-type": wire.FRAMES_MEDIA_TYPE, "content-length": str(size)}, pieces


def decode_items(
    spec: KVSpec, keys: Sequence[bytes], items: Sequence, out: Sequence[torch.Tensor] | None = None
) -> list[torch.Tensor | None]:
    """Blocks from frames (``None``: a miss), in the order asked, each verified against its key and the spec.

    With ``out`` (one block-shaped tensor per key, on any device) each hit is copied into its buffer.
    """
    if len(items) != len(keys):
        raise FrameError(f"the server answered {len(items)} items for {len(keys)} keys")
    if out is not None and len(out) != len(keys):
        raise ValueError(f"get needs one out buffer per key: got {len(keys)} keys and {len(out)} buffers")
    result: list[torch.Tensor | None] = []
    for i, (k, item) in enumerate(zip(keys, items)):
        if item is None:
            result.append(None)
            continue
        frame = decode_frame(item, expect_key=bytes.fromhex(k) if isinstance(k, str) else bytes(k), expect_spec=spec)
        if frame.codec != "identity":
            block = get_codec(frame.codec).decode(frame.data, frame.codec_meta, spec)
            result.append(block if out is None else out[i].copy_(block))
        elif out is not None:
            with warnings.catch_warnings():  # a read-only view, only read from
                warnings.simplefilter("ignore", UserWarning)
                result.append(out[i].copy_(tensor_from_bytes(frame.data, spec.torch_dtype, spec.block_shape)))
        else:
            result.append(tensor_from_bytes(bytearray(frame.data), spec.torch_dtype, spec.block_shape))
    return result


def decode_blocks(spec: KVSpec, keys: Sequence[bytes], body: bytes, out=None) -> list[torch.Tensor | None]:
    """Blocks of a REST get's answer (a msgpack stream of frames and nils)."""
    try:
        items = wire.split_items(body, max_items=len(keys) + 1)
    except (ValueError, ServiceError) as e:
        raise FrameError(f"the answer is not a frame stream: {e}") from None
    return decode_items(spec, keys, items, out)


class _Pieces:
    """A request body of several buffers, sent one after the other (re-iterable, for retries)."""

    def __init__(self, pieces: list) -> None:
        self.pieces = pieces

    def __iter__(self):
        return iter(self.pieces)


class _AsyncPieces(_Pieces):
    __iter__ = None  # type: ignore[assignment]  # httpx picks the async stream only for objects that are not sync iterables

    async def __aiter__(self):
        for p in self.pieces:
            yield p


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
        raise KVTierError(resp.status_code, err.get("code", "error"), err.get("message", ""), err.get("field"))
    except (ValueError, KeyError, TypeError):
        raise KVTierError(resp.status_code, "error", resp.text[:500]) from None


def _ssl_context(verify: bool | str):
    if isinstance(verify, bool):
        return verify
    import ssl

    return ssl.create_default_context(cafile=str(verify))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class _Base(ClientBase):
    def __init__(self, base_url: str, api_key: str | None, timeout: float, retries: int, backoff_s: float) -> None:
        super().__init__(timeout, retries, backoff_s)
        self.base_url = base_url.rstrip("/")
        self._kw = dict(base_url=self.base_url, headers=_headers(api_key), timeout=timeout)
        self._rbuf = bytearray()  # reused receive buffer of block answers (fresh pages cost more than the copy)
        self._rbuf_lock = threading.Lock()

    def _take_rbuf(self, n: int) -> tuple[bytearray, bool]:
        if n <= 0 or not self._rbuf_lock.acquire(blocking=False):
            return bytearray(max(n, 0)), False  # in use by another call: a private one
        if len(self._rbuf) < n:
            self._rbuf = bytearray(n)
        return self._rbuf, True

    def _give_rbuf(self, owned: bool) -> None:
        if owned:
            self._rbuf_lock.release()


class KVTierClient(_Base):
    """Synchronous REST client (``httpx.Client``, one connection pool).

    A ``unix://PATH`` URL gives the same client over the same-host shared-memory transport
    (``service.local_client.LocalKVTierClient``), chosen here so that every caller gets it.
    """

    def __new__(cls, base_url: str = "http://127.0.0.1:8080", *args, **kwargs):
        if cls is KVTierClient and isinstance(base_url, str) and base_url.startswith("unix://"):
            from .local_client import LocalKVTierClient

            return super().__new__(LocalKVTierClient)
        return super().__new__(cls)

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        verify: bool | str = True,
    ) -> None:
        """``verify``: for an ``https://`` url, the CA file (PEM) to trust, True for the system's, False for none."""
        super().__init__(base_url, api_key, timeout, retries, backoff_s)
        self._http = httpx.Client(**self._kw, verify=_ssl_context(verify))

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.request(method, path, **kw)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            else:
                if resp.status_code not in RETRY_STATUS or attempt == self.retries:
                    _raise_for(resp)
                    return resp
            time.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- API -------------------------------------------------------------------------------
    def healthz(self) -> bool:
        return self._request("GET", "/healthz").json()["status"] == "ok"

    def ready(self) -> dict:
        resp = self._http.get("/readyz")
        return resp.json()

    def register_spec(self, spec: KVSpec) -> str:
        model = self._request("POST", "/v1/specs", json=_spec_body(spec)).json()["model"]
        self._specs[model] = spec
        return model

    def unregister_spec(self, model: str) -> bool:
        """Withdraw this tenant's registration of ``model`` (404 unless it has one)."""
        self._specs.pop(model, None)
        return self._request("DELETE", f"/v1/specs/{model}").json()["unregistered"]

    def spec(self, model: str) -> KVSpec:
        if model not in self._specs:
            specs = self._request("GET", "/v1/specs").json()
            if model not in specs:
                raise KVTierError(404, "not_found", f"model {model!r} is not registered for this tenant", "model")
            self._specs[model] = KVSpec.from_dict(specs[model])
        return self._specs[model]

    def lookup(
        self, model: str, *, token_ids=None, hashes=None, salt: str = "", extra_keys: Sequence[str] = (), return_keys: bool = False
    ) -> Lookup:
        body = _lookup_body(model, token_ids, hashes, salt, extra_keys, return_keys)
        return _parse_lookup(self._request("POST", "/v1/lookup", json=body).json())

    def hashes(self, model: str, token_ids, *, salt: str = "", extra_keys: Sequence[str] = ()) -> list[bytes]:
        """The block hashes of ``token_ids``'s full blocks under the caller's tenant (the keys to put under)."""
        return _returned_keys(self.lookup(model, token_ids=token_ids, salt=salt, extra_keys=extra_keys, return_keys=True))

    def put(self, model: str, keys: Sequence[bytes], blocks, *, parent: bytes | None = None) -> list[bool]:
        headers, pieces = _body(encode_blocks(self.spec(model), keys, blocks))
        params = {"model": model} | ({"parent": _key_hex(parent)} if parent is not None else {})
        resp = self._request("PUT", "/v1/blocks", params=params, content=_Pieces(pieces), headers=headers)
        return resp.json()["stored"]

    def get(self, model: str, keys: Sequence[bytes], out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        """Blocks ``[L, 2, H_kv, T, D]`` per key (None: a miss); with ``out``, copied into those buffers."""
        spec = self.spec(model)
        body = {"model": model, "keys": [_key_hex(k) for k in keys]}
        for attempt in range(self.retries + 1):
            try:
                with self._http.stream("POST", "/v1/blocks/get", json=body) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        if resp.status_code not in RETRY_STATUS or attempt == self.retries:
                            _raise_for(resp)
                    else:
                        n = int(resp.headers.get("content-length", -1))
                        buf, owned = self._take_rbuf(n)
                        try:
                            if n < 0:
                                data = resp.read()
                            else:
                                pos = 0
                                for chunk in resp.iter_raw():
                                    if pos + len(chunk) > n:
                                        raise FrameError(f"the answer is longer than its Content-Length ({n})")
                                    buf[pos : pos + len(chunk)] = chunk
                                    pos += len(chunk)
                                data = memoryview(buf)[:pos]
                            return decode_blocks(spec, keys, data, out)
                        finally:
                            self._give_rbuf(owned)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            time.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

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
        """Top ``budget`` tokens per (layer, KV head) of the chain's cached prefix for ``q [L_q, H_q, D]``."""
        body = msgpack.packb(_query_body(model, q, budget, token_ids, hashes, salt, extra_keys, layers), use_bin_type=True)
        return _parse_retrieval(_msgpack_answer(self._request("POST", "/v1/retrieve", content=body, headers=_MSGPACK_HEADERS)))

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
        """``(o, lse)`` of ``q [L_q, H_q, D]`` over the chain's cached tokens (all, or ``budget`` selected per KV head)."""
        body = msgpack.packb(_query_body(model, q, budget, token_ids, hashes, salt, extra_keys, layers), use_bin_type=True)
        return _parse_attention(_msgpack_answer(self._request("POST", "/v1/attention", content=body, headers=_MSGPACK_HEADERS)))

    def delete(self, model: str, keys: Sequence[bytes]) -> int:
        return self._request("POST", "/v1/blocks/delete", json={"model": model, "keys": [_key_hex(k) for k in keys]}).json()["removed"]

    def pin(self, model: str, keys: Sequence[bytes], ttl_s: float) -> dict:
        return self._request("POST", "/v1/pins", json={"model": model, "keys": [_key_hex(k) for k in keys], "ttl_s": ttl_s}).json()

    def unpin(self, lease_id: int) -> bool:
        return self._request("DELETE", f"/v1/pins/{int(lease_id)}").json()["unpinned"]

    def stats(self) -> dict:
        return self._request("GET", "/v1/stats").json()

    def events(self, after: int = 0, limit: int = 1000) -> dict:
        return self._request("GET", "/v1/events", params={"after": after, "limit": limit}).json()


class AsyncKVTierClient(_Base):
    """asyncio REST client (``httpx.AsyncClient``); the same methods as ``KVTierClient``, awaited.
    A ``unix://PATH`` URL gives the same awaited methods over the same-host transport
    (``local_client.AsyncLocalKVTierClient``)."""

    def __new__(cls, base_url: str = "http://127.0.0.1:8080", *args, **kwargs):
        if cls is AsyncKVTierClient and isinstance(base_url, str) and base_url.startswith("unix://"):
            from .local_client import AsyncLocalKVTierClient

            return AsyncLocalKVTierClient(base_url, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        max_connections: int = 100,
        verify: bool | str = True,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retries, backoff_s)
        self._http = httpx.AsyncClient(
            **self._kw,
            verify=_ssl_context(verify),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                resp = await self._http.request(method, path, **kw)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            else:
                if resp.status_code not in RETRY_STATUS or attempt == self.retries:
                    _raise_for(resp)
                    return resp
            await asyncio.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def healthz(self) -> bool:
        return (await self._request("GET", "/healthz")).json()["status"] == "ok"

    async def register_spec(self, spec: KVSpec) -> str:
        model = (await self._request("POST", "/v1/specs", json=_spec_body(spec))).json()["model"]
        self._specs[model] = spec
        return model

    async def unregister_spec(self, model: str) -> bool:
        self._specs.pop(model, None)
        return (await self._request("DELETE", f"/v1/specs/{model}")).json()["unregistered"]

    async def spec(self, model: str) -> KVSpec:
        if model not in self._specs:
            specs = (await self._request("GET", "/v1/specs")).json()
            if model not in specs:
                raise KVTierError(404, "not_found", f"model {model!r} is not registered for this tenant", "model")
            self._specs[model] = KVSpec.from_dict(specs[model])
        return self._specs[model]

    async def lookup(
        self, model: str, *, token_ids=None, hashes=None, salt: str = "", extra_keys: Sequence[str] = (), return_keys: bool = False
    ) -> Lookup:
        body = _lookup_body(model, token_ids, hashes, salt, extra_keys, return_keys)
        return _parse_lookup((await self._request("POST", "/v1/lookup", json=body)).json())

    async def hashes(self, model: str, token_ids, *, salt: str = "", extra_keys: Sequence[str] = ()) -> list[bytes]:
        return _returned_keys(await self.lookup(model, token_ids=token_ids, salt=salt, extra_keys=extra_keys, return_keys=True))

    async def put(self, model: str, keys: Sequence[bytes], blocks, *, parent: bytes | None = None) -> list[bool]:
        headers, pieces = _body(encode_blocks(await self.spec(model), keys, blocks))
        params = {"model": model} | ({"parent": _key_hex(parent)} if parent is not None else {})
        resp = await self._request("PUT", "/v1/blocks", params=params, content=_AsyncPieces(pieces), headers=headers)
        return resp.json()["stored"]

    async def get(self, model: str, keys: Sequence[bytes], out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        spec = await self.spec(model)
        body = {"model": model, "keys": [_key_hex(k) for k in keys]}
        for attempt in range(self.retries + 1):
            try:
                async with self._http.stream("POST", "/v1/blocks/get", json=body) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        if resp.status_code not in RETRY_STATUS or attempt == self.retries:
                            _raise_for(resp)
                    else:
                        n = int(resp.headers.get("content-length", -1))
                        buf, owned = self._take_rbuf(n)
                        try:
                            if n < 0:
                                data = await resp.aread()
                            else:
                                pos = 0
                                async for chunk in resp.aiter_raw():
                                    if pos + len(chunk) > n:
                                        raise FrameError(f"the answer is longer than its Content-Length ({n})")
                                    buf[pos : pos + len(chunk)] = chunk
                                    pos += len(chunk)
                                data = memoryview(buf)[:pos]
                            return decode_blocks(spec, keys, data, out)
                        finally:
                            self._give_rbuf(owned)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            await asyncio.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

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
        body = msgpack.packb(_query_body(model, q, budget, token_ids, hashes, salt, extra_keys, layers), use_bin_type=True)
        resp = await self._request("POST", "/v1/retrieve", content=body, headers=_MSGPACK_HEADERS)
        return _parse_retrieval(_msgpack_answer(resp))

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
        body = msgpack.packb(_query_body(model, q, budget, token_ids, hashes, salt, extra_keys, layers), use_bin_type=True)
        resp = await self._request("POST", "/v1/attention", content=body, headers=_MSGPACK_HEADERS)
        return _parse_attention(_msgpack_answer(resp))

    async def delete(self, model: str, keys: Sequence[bytes]) -> int:
        resp = await self._request("POST", "/v1/blocks/delete", json={"model": model, "keys": [_key_hex(k) for k in keys]})
        return resp.json()["removed"]

    async def pin(self, model: str, keys: Sequence[bytes], ttl_s: float) -> dict:
        resp = await self._request("POST", "/v1/pins", json={"model": model, "keys": [_key_hex(k) for k in keys], "ttl_s": ttl_s})
        return resp.json()

    async def unpin(self, lease_id: int) -> bool:
        return (await self._request("DELETE", f"/v1/pins/{int(lease_id)}")).json()["unpinned"]

    async def stats(self) -> dict:
        return (await self._request("GET", "/v1/stats")).json()

    async def events(self, after: int = 0, limit: int = 1000) -> dict:
        return (await self._request("GET", "/v1/events", params={"after": after, "limit": limit})).json()
