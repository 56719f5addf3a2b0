"""KVService: every operation of the API, independent of the transport (REST and gRPC both call it).

Its methods are synchronous and may block (disk, Redis): the transports call them in worker
threads. Each method validates its arguments completely before it changes anything, and raises
a ``ServiceError`` (naming the field) for a caller's mistake. Blocks are addressed by the
caller's client keys and stored under per-tenant storage keys (``service.tenancy``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from kvtier.kvstore import FrameError, KVSpec, Namespace, TieredStore, chain_hashes, decode_frame, encode_frame, get_codec
from kvtier.kvstore.frames import encode_frame_parts
from kvtier.kvstore.codecs.base import tensor_bytes, tensor_from_bytes

from kvtier.retrieval import StoreRetriever, SummaryStore

from . import wire
from .buffers import BufferPool
from .errors import BadRequest, Conflict, NotFound, PayloadTooLarge, TooManyRequests
from .limits import MAX_EXTRA_KEYS, MAX_MODEL_CHARS, MAX_NAMESPACE_CHARS, MAX_TOKEN_ID, TenantRateLimiter
from .registry import SpecRegistry
from .settings import Settings
from .storebuild import TierProbe, blocks_dir
from .tenancy import KeySpace, Principal

log = logging.getLogger(__name__)

_SPEC_FIELDS = ("model_id", "num_layers", "num_kv_heads", "head_dim", "dtype", "block_tokens")


class WouldBlock(Exception):
    """``KVService.lookup(wait=False)`` found the store's lock taken: ask again from a worker thread."""


@dataclass(frozen=True)
class LeaseInfo:
    id: int
    tenant: str
    expires_at: float  # time.monotonic()
    num_pinned: int


class KVService:
    def __init__(self, settings: Settings, store: TieredStore, registry: SpecRegistry, metrics=None) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.probe = TierProbe(settings, store.tier_names)
        # reused buffers for upload bodies (idle ones bounded)
        self.buffers = BufferPool(min(settings.max_request_bytes, 256 << 20))
        self.rate = TenantRateLimiter(settings.tenant_requests_per_s, settings.tenant_burst)
        self.transport_stats = None  # the REST app's connection and request guards (connections.TransportStats)
        self._keyspaces: dict[str, KeySpace] = {}
        self._lock = threading.Lock()
        self._leases: dict[int, LeaseInfo] = {}
        self._tenant_leases: dict[str, int] = {}  # tenant -> live leases in self._leases
        # each tenant's own events, numbered in its own sequence: (seq, store event, client key)
        self._tenant_events: dict[str, deque] = {}
        self._tenant_seq: dict[str, int] = {}
        self._events_ingested = store.last_event_id  # store events up to this id were routed (or predate the service)
        # storage key -> (tenant, client key): lets a tenant see its own blocks' events
        self._owners: OrderedDict[bytes, tuple[str, bytes]] = OrderedDict()
        # a lookup is bookkeeping only (no shared tier, or redis_lookup_wait_s = 0): answered without I/O
        self.store_is_local = not store.lookup_waits_on_io
        # page summaries of every block put through the service (bounded LRU in host memory), for retrieval
        self.summarize_on_put = settings.summary_capacity_bytes > 0
        self.retriever = StoreRetriever(
            store,
            SummaryStore(max_bytes=max(1, int(settings.summary_capacity_bytes))),
            num_sink=settings.retrieve_sink_tokens,
            num_recent=settings.retrieve_recent_tokens,
        )
        self._tier_attention: dict[KVSpec, Any] = {}  # spec -> retrieval.TierAttention (blocks stored paged)
        for spec in registry.all_specs():  # re-adopt what the disk tier kept across a restart
            store.register_spec(spec)
        # blocks a write-through tier (Redis) refused while down reach it once it is back, even without new puts
        self._stop = threading.Event()
        self._retrier: threading.Thread | None = None
        if settings.write_through_retry_interval_s > 0:
            self._retrier = threading.Thread(target=self._retry_write_through, name="kvtier-write-through-retry", daemon=True)
            self._retrier.start()
        self.kv_events = None  # vLLM-format KV events on ZMQ (service.kv_events), when kv_events_endpoint is set
        if settings.kv_events_endpoint:
            from .kv_events import KVEventPublisher

            self.kv_events = KVEventPublisher(
                settings.kv_events_endpoint,
                self._wire_events,
                topic=settings.kv_events_topic,
                interval_s=settings.kv_events_interval_s,
                max_batch=settings.max_events_per_request,
                start_after=store.last_event_id,
                replay_endpoint=settings.kv_events_replay_endpoint,
                buffer_batches=settings.kv_events_buffer_batches,
            )

    def _wire_events(self, after: int, limit: int) -> tuple[list[tuple[str, bytes, str, int | None]], int]:
        """Store events after ``after`` as (kind, key engines use, tier, block_tokens) for the KV-event publisher."""
        batch = self.store.events(after=after, limit=limit)
        if not batch:
            return [], after
        out = []
        with self._lock:
            for ev in batch:
                owner = self._owners.get(ev.key)
                spec = self.registry.spec_of_short_fingerprint(ev.model)
                out.append((ev.kind, owner[1] if owner else ev.key, ev.tier, spec.block_tokens if spec else None))
        return out, batch[-1].id

    def _retry_write_through(self) -> None:
        while not self._stop.wait(self.settings.write_through_retry_interval_s):
            with self._lock:
                self._ingest_events()  # before the store's bounded stream drops them
            try:
                if self.store.write_through_pending():
                    self.store.retry_write_through(limit=64)
            except Exception:  # a tier failing is counted by the tier; this thread must go on
                log.exception("retrying refused write-throughs failed")

    # -- helpers ---------------------------------------------------------------------------
    def invalidated(self, keys: list[bytes] | None, deleted: bool) -> None:
        """Another instance deleted or rewrote these blocks (storage keys) in Redis: forget their summaries."""
        if keys:
            self.retriever.summaries.discard(keys)

    def admit(self, p: Principal) -> Principal:
        """Count one request of ``p``'s tenant against its rate (``RateLimited`` beyond it); returns ``p``."""
        self.rate.admit(p.tenant)
        return p

    def keyspace(self, tenant: str) -> KeySpace:
        ks = self._keyspaces.get(tenant)
        if ks is None:
            ks = self._keyspaces[tenant] = KeySpace(tenant)
        return ks

    def spec_of(self, p: Principal, model: str) -> KVSpec:
        return self.registry.get(p.tenant, model)

    def _client_keys(self, values: Sequence[Any], field: str, *, limit: int | None = None) -> list[bytes]:
        limit = self.settings.max_blocks_per_request if limit is None else limit
        if not isinstance(values, (list, tuple)):
            raise BadRequest(f"{field} must be a list of block hashes", field=field)
        if not values:
            raise BadRequest(f"{field} must name at least one block hash", field=field)
        if len(values) > limit:
            raise PayloadTooLarge(
                f"{field} names {len(values)} blocks, at most {limit} are allowed per request (max_blocks_per_request)", field=field
            )
        if all(type(v) is bytes and len(v) == 32 for v in values):  # raw keys (the local transport, gRPC): nothing to parse
            return list(values)
        return [parse_client_key(v, f"{field}[{i}]") for i, v in enumerate(values)]

    def _track(self, tenant: str, pairs: list[tuple[bytes, bytes]]) -> None:
        cap = self.settings.max_tracked_keys
        if not cap:
            return
        with self._lock:
            owners = self._owners
            for skey, ckey in pairs:
                owners[skey] = (tenant, ckey)
                owners.move_to_end(skey)
            while len(owners) > cap:
                owners.popitem(last=False)

    def _untrack(self, skeys: list[bytes]) -> None:
        with self._lock:
            for skey in skeys:
                self._owners.pop(skey, None)

    # -- specs -----------------------------------------------------------------------------
    def register_spec(self, p: Principal, fields: dict) -> tuple[str, KVSpec]:
        if not isinstance(fields, dict):
            raise BadRequest("spec must be an object with fields " + ", ".join(_SPEC_FIELDS), field="spec")
        try:
            spec = KVSpec.from_dict(fields)
        except ValueError as e:
            raise BadRequest(f"invalid spec: {e}", field=_spec_error_field(str(e))) from None
        if spec.block_nbytes > self.settings.max_block_bytes:
            raise PayloadTooLarge(
                f"a block of this spec is {spec.block_nbytes} bytes, more than max_block_bytes ({self.settings.max_block_bytes})",
                field="spec",
            )
        model, new = self.registry.register(p.tenant, spec)
        if new:
            self.store.register_spec(spec)
        return model, spec

    def unregister_spec(self, p: Principal, model: str) -> bool:
        """Withdraw the caller's registration of ``model`` (NotFound unless it has one); it no longer
        counts against the caller's ``max_specs_per_tenant``, nor, once no tenant has it, ``max_specs``."""
        if not isinstance(model, str) or len(model) > MAX_MODEL_CHARS:
            raise BadRequest("model must be a model id (64 hex characters)", field="model")
        return self.registry.unregister(p.tenant, model)

    # -- lookup ----------------------------------------------------------------------------
    def lookup(
        self,
        p: Principal,
        model: str,
        *,
        token_ids=None,
        hashes=None,
        salt: str = "",
        extra_keys: Sequence[str] = (),
        return_keys: bool = False,
        wait: bool = True,
    ) -> dict:
        """``wait=False`` (a caller on an event loop): raise ``WouldBlock`` rather than wait for the
        store's lock (held for bookkeeping only, so this is rare); the caller retries on a thread."""
        spec = self.spec_of(p, model)
        if (token_ids is None) == (hashes is None):
            raise BadRequest("give exactly one of token_ids and hashes", field="token_ids")
        ckeys: Sequence[bytes]
        if hashes is not None:  # a chain as long as the longest token lookup (blocks of at least 16 tokens)
            ckeys = self._client_keys(hashes, "hashes", limit=max(1, self.settings.max_tokens_per_request // 16))
        else:
            ckeys = chain_hashes(spec, self._tokens(token_ids), self._namespace(p, salt, extra_keys))
        result = self.store.lookup(spec, self.keyspace(p.tenant).storage_keys(ckeys), wait=wait)
        if result is None:
            raise WouldBlock()
        if self.metrics is not None:
            self.metrics.lookup_hit.inc(result.num_blocks)
            self.metrics.lookup_miss.inc(len(ckeys) - result.num_blocks)
        out = {
            "model": model,
            "num_blocks": result.num_blocks,
            "num_tokens": result.num_blocks * spec.block_tokens,
            "num_requested_blocks": len(ckeys),
            "tier_hits": result.tier_hits,
            "tier_prefix": result.tier_prefix,
        }
        if return_keys:
            out["keys"] = [k.hex() for k in ckeys]
        return out

    def _tokens(self, token_ids) -> np.ndarray:
        limit = self.settings.max_tokens_per_request
        if isinstance(token_ids, np.ndarray):
            arr = token_ids
        elif isinstance(token_ids, (list, tuple)):
            if len(token_ids) > limit:
                raise PayloadTooLarge(
                    f"token_ids holds {len(token_ids)} ids, at most {limit} are allowed (max_tokens_per_request)", field="token_ids"
                )
            if any(isinstance(t, bool) or not isinstance(t, int) for t in token_ids):
                bad = next(i for i, t in enumerate(token_ids) if isinstance(t, bool) or not isinstance(t, int))
                raise BadRequest(f"token_ids[{bad}] must be an integer, got {type(token_ids[bad]).__name__}", field=f"token_ids[{bad}]")
            try:
                arr = np.asarray(token_ids, dtype=np.int64)
            except OverflowError:
                raise BadRequest("token_ids must lie in [0, 2**32)", field="token_ids") from None
        else:
            raise BadRequest("token_ids must be a list of integers", field="token_ids")
        if arr.ndim != 1:
            raise BadRequest(f"token_ids must be one-dimensional, got shape {list(arr.shape)}", field="token_ids")
        if arr.size > limit:
            raise PayloadTooLarge(
                f"token_ids holds {arr.size} ids, at most {limit} are allowed (max_tokens_per_request)", field="token_ids"
            )
        if arr.size and arr.dtype.kind not in "iu":
            raise BadRequest(f"token_ids must be integers, got {arr.dtype}", field="token_ids")
        if arr.size and (arr.min() < 0 or arr.max() > MAX_TOKEN_ID):
            bad = int(np.nonzero((arr < 0) | (arr > MAX_TOKEN_ID))[0][0])
            raise BadRequest(f"token_ids[{bad}] = {int(arr[bad])} is outside [0, 2**32)", field=f"token_ids[{bad}]")
        return arr

    @staticmethod
    def _namespace(p: Principal, salt: str, extra_keys: Sequence[str]) -> Namespace:
        if not isinstance(salt, str) or len(salt) > MAX_NAMESPACE_CHARS or not _is_utf8(salt):
            raise BadRequest(
                f"salt must be a string of at most {MAX_NAMESPACE_CHARS} characters (valid Unicode: no lone surrogates)", field="salt"
            )
        if not isinstance(extra_keys, (list, tuple)) or len(extra_keys) > MAX_EXTRA_KEYS:
            raise BadRequest(f"extra_keys must be a list of at most {MAX_EXTRA_KEYS} strings", field="extra_keys")
        for i, k in enumerate(extra_keys):
            if not isinstance(k, str) or len(k) > MAX_NAMESPACE_CHARS or not _is_utf8(k):
                raise BadRequest(
                    f"extra_keys[{i}] must be a string of at most {MAX_NAMESPACE_CHARS} characters (valid Unicode: no lone surrogates)",
                    field=f"extra_keys[{i}]",
                )
        return Namespace(tenant=p.tenant, salt=salt, extra_keys=tuple(extra_keys))

    # -- blocks ----------------------------------------------------------------------------
    def decode_frames(self, spec: KVSpec, items: Sequence[memoryview | None]) -> tuple[list[bytes], list[torch.Tensor]]:
        """Client keys and blocks of a put's frames, each verified; BadRequest names the first bad frame."""
        if not items:
            raise BadRequest("the body holds no frames", field="frames")
        if len(items) > self.settings.max_blocks_per_request:
            raise PayloadTooLarge(
                f"{len(items)} frames, at most {self.settings.max_blocks_per_request} are allowed per request (max_blocks_per_request)",
                field="frames",
            )
        keys, blocks = [], []
        seen: dict[bytes, int] = {}  # key -> the first frame that carried it
        for i, item in enumerate(items):
            field = f"frames[{i}]"
            if item is None:
                raise BadRequest(f"{field} is nil; a put carries one frame per block", field=field)
            try:
                frame = decode_frame(item, expect_spec=spec)
            except FrameError as e:
                self._rejected("invalid")
                raise BadRequest(f"{field}: {e}", field=field) from None
            if frame.shape != spec.block_shape:
                self._rejected("shape")
                raise BadRequest(
                    f"{field}.shape must be {list(spec.block_shape)} for this spec, got {list(frame.shape)}", field=f"{field}.shape"
                )
            if frame.dtype != spec.dtype:
                self._rejected("dtype")
                raise BadRequest(f"{field}.dtype must be {spec.dtype!r} for this spec, got {frame.dtype!r}", field=f"{field}.dtype")
            if frame.key in seen:
                raise BadRequest(f"{field}.key repeats frames[{seen[frame.key]}].key", field=f"{field}.key")
            seen[frame.key] = i
            try:
                if frame.codec == "identity":  # a view of the body: the tiers copy what they keep
                    block = tensor_from_bytes(frame.data, spec.torch_dtype, spec.block_shape)
                else:
                    block = get_codec(frame.codec).decode(frame.data, frame.codec_meta, spec)
            except Exception as e:  # whatever a codec raises on a payload that is not its own
                self._rejected("payload")
                raise BadRequest(f"{field}: the payload does not decode with codec {frame.codec!r}: {e}", field=f"{field}.data") from None
            keys.append(frame.key)
            blocks.append(block)
        return keys, blocks

    def _rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.frames_rejected.labels(reason).inc()

    def put(
        self, p: Principal, model: str, keys: list[bytes], blocks: list[torch.Tensor], parent=None, *, summarize: bool = True
    ) -> list[bool]:
        """Store a chain of blocks (already decoded by ``decode_frames``) under the caller's key space.
        ``summarize=False``: the caller computes the page summaries later (``summarize``)."""
        spec = self.spec_of(p, model)
        parent_key = None if parent in (None, "", b"") else parse_client_key(parent, "parent")
        ks = self.keyspace(p.tenant)
        skeys = ks.storage_keys(keys)
        # the retriever's put also summarizes
        put = self.retriever.put if self.summarize_on_put and summarize else self.store.put
        self._track(p.tenant, list(zip(skeys, keys)))  # before the store emits their events
        stored = put(spec, skeys, blocks, tenant=p.tenant, parent=None if parent_key is None else ks.storage_key(parent_key))
        return stored

    def summarize(self, p: Principal, keys: list[bytes], blocks: list[torch.Tensor], stored: list[bool]) -> None:
        """The page summaries of blocks ``put(..., summarize=False)`` stored (those still unsummarized)."""
        if not self.summarize_on_put:
            return
        summaries = self.retriever.summaries
        for skey, block, ok in zip(self.keyspace(p.tenant).storage_keys(keys), blocks, stored):
            if ok and skey not in summaries:
                summaries.add(skey, block)

    def summarize_leased(self, p: Principal, keys: list[bytes], blocks: list[torch.Tensor], stored: list[bool]) -> None:
        """``summarize`` after a put of buffers from ``store.lease_buffer`` (the local transport's streamed put),
        run after the answer: each summary is made from the block the first tier holds and kept only if
        that entry was not removed meanwhile (its buffer may then have been reused for another block);
        a summary not kept is made again when a query needs it."""
        if not self.summarize_on_put:
            return
        from kvtier.retrieval.summaries import summarize_block

        summaries, store = self.retriever.summaries, self.store
        for skey, block, ok in zip(self.keyspace(p.tenant).storage_keys(keys), blocks, stored):
            if not ok or skey in summaries:
                continue
            token, held = store.first_tier_entry(skey, block)
            if held is None:
                continue  # not in the first tier (refused there, or removed already)
            summary = summarize_block(held, summaries.page_tokens, summaries.dtype)
            if store.first_tier_holds(skey, token):
                summaries.keep(skey, summary)

    def discard_summaries(self, p: Principal, keys: list[bytes]) -> None:
        """Forget the page summaries of ``keys`` (client keys of ``p``'s tenant): recomputed when next needed."""
        if self.summarize_on_put:
            self.retriever.summaries.discard(self.keyspace(p.tenant).storage_keys(keys))

    def put_frames(self, p: Principal, model: str, items: Sequence[memoryview | None], parent=None) -> list[bool]:
        spec = self.spec_of(p, model)
        if parent not in (None, "", b""):
            parse_client_key(parent, "parent")  # checked before the frames: nothing is decoded for a bad request
        keys, blocks = self.decode_frames(spec, items)
        return self.put(p, model, keys, blocks, parent)

    def get(self, p: Principal, model: str, keys: Sequence[Any]) -> tuple[KVSpec, list[bytes], list[torch.Tensor | None]]:
        spec = self.spec_of(p, model)
        ckeys = self._client_keys(keys, "keys")
        return spec, ckeys, self.get_checked(p, spec, ckeys)

    def get_checked(
        self, p: Principal, spec: KVSpec, ckeys: list[bytes], out: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor | None]:
        """``get`` of keys already parsed (streaming transports fetch a request in groups), into ``out`` when given."""
        blocks = self.store.get(spec, self.keyspace(p.tenant).storage_keys(ckeys), out=out)
        if self.metrics is not None:
            hits = sum(b is not None for b in blocks)
            self.metrics.get_blocks.labels("hit").inc(hits)
            self.metrics.get_blocks.labels("miss").inc(len(blocks) - hits)
        return blocks

    @staticmethod
    def encode_block(spec: KVSpec, client_key: bytes, block: torch.Tensor) -> bytes:
        """The frame of one block as the client sees it (its own key, identity codec)."""
        return encode_frame(client_key, spec, "identity", {}, spec.block_shape, spec.dtype, tensor_bytes(block))

    @staticmethod
    def encode_block_parts(spec: KVSpec, client_key: bytes, block: torch.Tensor) -> tuple[bytes, memoryview]:
        """``encode_block`` as (header, payload view of ``block``): nothing copied."""
        return encode_frame_parts(client_key, spec, "identity", {}, spec.block_shape, spec.dtype, tensor_bytes(block))

    def delete(self, p: Principal, model: str, keys: Sequence[Any]) -> int:
        spec = self.spec_of(p, model)
        skeys = self.keyspace(p.tenant).storage_keys(self._client_keys(keys, "keys"))
        n = self.store.remove(spec, skeys)
        self.retriever.summaries.discard(skeys)
        if self.kv_events is not None:
            self.kv_events.publish_pending()  # while the owners are known: events carry the keys clients use
        with self._lock:
            self._ingest_events()  # the owner still known: the tenant sees its "removed" events
        self._untrack(skeys)
        return n

    # -- retrieval and attention next to the data --------------------------------------------
    def _chain(self, p: Principal, spec: KVSpec, token_ids, hashes, salt: str, extra_keys: Sequence[str]) -> Sequence[bytes]:
        """The client keys of a chain given by token ids (hashed under the caller's tenant) or by hashes."""
        if (token_ids is None) == (hashes is None):
            raise BadRequest("give exactly one of token_ids and hashes", field="token_ids")
        if hashes is not None:
            return self._client_keys(hashes, "hashes", limit=max(1, self.settings.max_tokens_per_request // 16))
        return chain_hashes(spec, self._tokens(token_ids), self._namespace(p, salt, extra_keys))  # [] under one block: nothing cached

    def _query(self, spec: KVSpec, q, layers, budget, *, budget_required: bool) -> tuple[torch.Tensor, list[int], int | None]:
        """The decode query ``[L_q, H_q, D]`` as float32, its layers and the budget, each checked (BadRequest names the field)."""
        s = self.settings
        if layers is None:
            layers = list(range(spec.num_layers))
        elif not isinstance(layers, (list, tuple)) or not layers:
            raise BadRequest(f"layers must be a non-empty list of layer ids in [0, {spec.num_layers})", field="layers")
        else:
            layers = list(layers)
            if len(layers) > spec.num_layers:
                raise BadRequest(f"layers names {len(layers)} layers, the spec has {spec.num_layers}", field="layers")
            for i, x in enumerate(layers):
                if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= int(x) < spec.num_layers:
                    raise BadRequest(f"layers[{i}] must be a layer id in [0, {spec.num_layers}), got {x!r}"[:200], field=f"layers[{i}]")
            layers = [int(x) for x in layers]
            if len(set(layers)) != len(layers):
                raise BadRequest("layers must not repeat a layer", field="layers")
        H_kv, D = spec.num_kv_heads, spec.head_dim
        if not isinstance(q, torch.Tensor):
            q = wire.tensor_from_wire(q, "q", ndim=3, max_elements=len(layers) * s.max_query_heads * D)
        if q.dim() != 3:
            raise BadRequest(f"q must be [L_q, H_q, D], got shape {list(q.shape)}", field="q.shape")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise BadRequest(f"q.dtype must be float16, bfloat16 or float32, got {q.dtype}", field="q.dtype")
        L_q, H_q, Dq = q.shape
        if L_q != len(layers) or Dq != D or H_q == 0 or H_q % H_kv or H_q > s.max_query_heads:
            raise BadRequest(
                f"q.shape must be [{len(layers)} (one query per layer asked), a multiple of num_kv_heads={H_kv} "
                f"up to {s.max_query_heads}, head_dim={D}], got {list(q.shape)}",
                field="q.shape",
            )
        q = q.float()
        if not bool(torch.isfinite(q).all()):
            raise BadRequest("q holds NaN or infinite values", field="q.data")
        if budget is None:
            if budget_required:
                raise BadRequest("budget is required (tokens per layer and KV head)", field="budget")
            return q, layers, None
        low = self.retriever.num_sink + self.retriever.num_recent
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not max(1, low) <= int(budget) <= s.max_retrieve_budget:
            raise BadRequest(
                f"budget must be an integer in [{max(1, low)}, {s.max_retrieve_budget}] (at least the sink and "
                f"recent tokens every selection keeps, at most max_retrieve_budget), got {budget!r}"[:300],
                field="budget",
            )
        budget = int(budget)
        held = L_q * H_kv * budget * (2 * D * spec.torch_dtype.itemsize + 8)
        if held > s.max_request_bytes:
            raise PayloadTooLarge(
                f"the selection of {L_q} layers x {H_kv} KV heads x {budget} tokens would hold {held} bytes, "
                f"more than max_request_bytes ({s.max_request_bytes}): lower budget or ask fewer layers",
                field="budget",
            )
        return q, layers, budget

    def _retrieve(self, spec: KVSpec, skeys: list[bytes], q: torch.Tensor, budget: int, layers: list[int]):
        for _attempt in range(3):  # a block evicted between the lookup and the read: search again
            try:
                return self.retriever.retrieve(spec, skeys, q, budget, layers=layers)
            except RuntimeError as e:
                if "vanished" not in str(e):
                    raise
        raise Conflict("the chain's blocks kept being evicted during the retrieval; retry", field="hashes")

    def retrieve(
        self,
        p: Principal,
        model: str,
        *,
        q,
        budget,
        token_ids=None,
        hashes=None,
        salt: str = "",
        extra_keys: Sequence[str] = (),
        layers=None,
    ) -> dict:
        """Top tokens of the cached prefix of a chain for one decode query per layer (``StoreRetriever``).

        Answers ``token_ids [L_q, H_kv, budget]`` int64 (positions in the sequence, ascending, -1
        padding) and the chain positions of the blocks read. A chain not cached for this tenant
        searches nothing: ``num_tokens = 0`` and every id is -1.
        """
        spec = self.spec_of(p, model)
        ckeys = self._chain(p, spec, token_ids, hashes, salt, extra_keys)
        q, layers, budget = self._query(spec, q, layers, budget, budget_required=True)
        skeys = self.keyspace(p.tenant).storage_keys(ckeys)
        res = self._retrieve(spec, skeys, q, budget, layers)
        pos = {k: i for i, k in enumerate(skeys)}
        return {
            "model": model,
            "layers": layers,
            "budget": budget,
            "num_tokens": res.num_tokens,
            "num_blocks": res.num_blocks,
            "num_requested_blocks": len(ckeys),
            "token_ids": res.token_ids,
            "fetched": [pos[k] for k in res.fetched],
            "summarized": res.summarized,
        }

    def attention(
        self,
        p: Principal,
        model: str,
        *,
        q,
        budget=None,
        token_ids=None,
        hashes=None,
        salt: str = "",
        extra_keys: Sequence[str] = (),
        layers=None,
    ) -> dict:
        """Decode attention of ``q [L_q, H_q, D]`` over the cached prefix of a chain, next to the data.

        ``budget`` set: over the tokens ``StoreRetriever`` selects (only the blocks holding them are
        read); ``None``: over every cached token (the blocks are read in groups, states merged).
        Answers ``o [L_q, H_q, D]`` and natural-log ``lse [L_q, H_q]``, both float32: the engine
        merges them with attention over its local tokens (``sparse_attn.merge_states``). Nothing
        cached: ``o = 0``, ``lse = -inf`` (a state that merges as nothing).
        """
        from kvtier.sparse_attn import merge_states, sparse_decode

        spec = self.spec_of(p, model)
        ckeys = self._chain(p, spec, token_ids, hashes, salt, extra_keys)
        q, layers, budget = self._query(spec, q, layers, budget, budget_required=False)
        skeys = self.keyspace(p.tenant).storage_keys(ckeys)
        L_q, H_q, D = q.shape
        o = torch.zeros(L_q, H_q, D, dtype=torch.float32)
        lse = torch.full((L_q, H_q), float("-inf"), dtype=torch.float32)
        pos = {k: i for i, k in enumerate(skeys)}
        if budget is not None:
            tiered = self._attention_from_pages(spec, skeys, q, budget, layers)
            if tiered is not None:
                o, lse, n_blocks, attended, fetched = tiered
                return {
                    "model": model,
                    "layers": layers,
                    "budget": budget,
                    "num_tokens": n_blocks * spec.block_tokens,
                    "num_blocks": n_blocks,
                    "num_requested_blocks": len(ckeys),
                    "attended": attended,
                    "fetched": fetched,
                    "o": o,
                    "lse": lse,
                }
            res = self._retrieve(spec, skeys, q, budget, layers)
            if res.num_tokens:
                local = torch.where(res.valid, torch.arange(budget).expand_as(res.token_ids), -1)  # ids into res.k / res.v
                o, lse = sparse_decode(q, res.k.float(), res.v.float(), local)
            return {
                "model": model,
                "layers": layers,
                "budget": budget,
                "num_tokens": res.num_tokens,
                "num_blocks": res.num_blocks,
                "num_requested_blocks": len(ckeys),
                "attended": int(res.valid.sum(-1).max()) if res.num_tokens else 0,
                "fetched": [pos[k] for k in res.fetched],
                "o": o.float(),
                "lse": lse.float(),
            }
        cached = self.store.lookup(spec, skeys)
        assert cached is not None  # lookup waits for the lock unless told not to
        n_blocks = cached.num_blocks
        group = max(1, (32 << 20) // spec.block_nbytes)
        li = torch.tensor(layers)
        done = 0
        while done < n_blocks:
            keys = skeys[done : min(n_blocks, done + group)]
            blocks: list[torch.Tensor] = []
            for b in self.store.get(spec, keys):
                if b is None:  # evicted since the lookup: attend the prefix before it
                    n_blocks = done + len(blocks)
                    break
                blocks.append(b)
            if not blocks:
                break
            dev = blocks[0].device  # attend where the blocks are (a CUDA device tier: the Triton kernel)
            kv = torch.stack([b.to(dev) for b in blocks])[:, li.to(dev)].float()  # [g, L_q, 2, H_kv, BT, D]
            g, BT = kv.shape[0], spec.block_tokens
            k = kv[:, :, 0].permute(1, 2, 0, 3, 4).reshape(L_q, spec.num_kv_heads, g * BT, D)
            v = kv[:, :, 1].permute(1, 2, 0, 3, 4).reshape(L_q, spec.num_kv_heads, g * BT, D)
            o_g, lse_g = sparse_decode(q.to(dev), k, v)
            o, lse = merge_states(o, lse, o_g.float().cpu(), lse_g.float().cpu())
            done += g
        return {
            "model": model,
            "layers": layers,
            "budget": None,
            "num_tokens": n_blocks * spec.block_tokens,
            "num_blocks": n_blocks,
            "num_requested_blocks": len(ckeys),
            "attended": n_blocks * spec.block_tokens,
            "fetched": list(range(n_blocks)),
            "o": o.float(),
            "lse": lse.float(),
        }

    def _attention_from_pages(self, spec: KVSpec, skeys: list[bytes], q: torch.Tensor, budget: int, layers: list[int]):
        """Attention through ``retrieval.TierAttention`` when every cached block of the chain is stored
        with a page-addressable codec in a tier that serves ranges: only the selected pages are read.
        ``None`` otherwise (the caller falls back to ``StoreRetriever``, which reads whole blocks)."""
        from kvtier.retrieval.tier_attention import TierAttention

        cached = self.store.lookup(spec, skeys)
        assert cached is not None  # lookup waits for the lock unless told not to
        n_blocks = cached.num_blocks
        if not n_blocks:
            return None
        layouts = self.store.page_layouts(spec, skeys[:n_blocks])
        if any(lay is None for lay in layouts):
            return None
        with self._lock:
            att = self._tier_attention.get(spec)
            if att is None:
                att = self._tier_attention[spec] = TierAttention(
                    self.store,
                    spec,
                    budget=budget,
                    page_cache_bytes=int(self.settings.tier_page_cache_bytes),
                    summary_bytes=max(1, int(self.settings.summary_capacity_bytes)),
                )
        try:
            ctx = att.open(skeys[:n_blocks])
            o = torch.zeros(q.shape, dtype=torch.float32)
            lse = torch.zeros(q.shape[:2], dtype=torch.float32)
            for i, layer in enumerate(layers):
                o[i], lse[i] = att.decode_layer(ctx, layer, q[i], budget=budget)
        except (ValueError, RuntimeError):  # evicted or rewritten since the lookup: the whole-block path decides
            return None
        Np = spec.block_tokens // ctx.layouts[0].page_tokens
        pages = torch.cat([ctx.last_pages[layer].flatten() for layer in layers])
        fetched = sorted({int(g) // Np for g in pages.tolist()})
        attended = int(max(ctx.last_pages[layer].shape[1] for layer in layers)) * ctx.layouts[0].page_tokens
        return o, lse, n_blocks, attended, fetched

    # -- pins ------------------------------------------------------------------------------
    def pin(self, p: Principal, model: str, keys: Sequence[Any], ttl_s: float) -> LeaseInfo:
        spec = self.spec_of(p, model)
        ckeys = self._client_keys(keys, "keys")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not (0 < ttl_s <= self.settings.max_pin_ttl_s):
            raise BadRequest(f"ttl_s must be a number in (0, {self.settings.max_pin_ttl_s}], got {ttl_s!r}", field="ttl_s")
        s = self.settings
        with self._lock:
            now = time.monotonic()
            for lid in [lid for lid, info in self._leases.items() if info.expires_at <= now]:
                info = self._leases.pop(lid)
                self._tenant_leases[info.tenant] -= 1
            # per tenant first: one tenant's leases never make another's pins fail (while tenants x per-tenant <= max_leases)
            if self._tenant_leases.get(p.tenant, 0) >= s.max_leases_per_tenant:
                raise TooManyRequests(
                    f"this tenant holds {s.max_leases_per_tenant} live leases (max_leases_per_tenant); unpin or wait for expiry",
                    field="keys",
                )
            if len(self._leases) >= s.max_leases:
                raise TooManyRequests(f"{s.max_leases} leases are live (max_leases); unpin or wait for expiry", field="keys")
            lease = self.store.pin(spec, self.keyspace(p.tenant).storage_keys(ckeys), float(ttl_s))
            if lease.num_pinned == 0:  # nothing of this tenant's is cached under these keys: no lease is held
                self.store.unpin(lease.id)
                return LeaseInfo(0, p.tenant, now, 0)
            info = LeaseInfo(lease.id, p.tenant, time.monotonic() + float(ttl_s), lease.num_pinned)
            self._leases[lease.id] = info
            self._tenant_leases[p.tenant] = self._tenant_leases.get(p.tenant, 0) + 1
        return info

    def unpin(self, p: Principal, lease_id: int) -> bool:
        """End a lease early. Lease 0 (a pin that pinned nothing) holds nothing: False."""
        if lease_id == 0:
            return False
        with self._lock:
            info = self._leases.get(lease_id)
            if info is None or info.tenant != p.tenant or info.expires_at <= time.monotonic():
                if info is not None and info.expires_at <= time.monotonic():
                    del self._leases[lease_id]
                    self._tenant_leases[info.tenant] -= 1
                raise NotFound(f"lease {lease_id} is unknown or expired", field="lease_id")
            del self._leases[lease_id]
            self._tenant_leases[info.tenant] -= 1
        return self.store.unpin(lease_id)

    # -- stats and events ------------------------------------------------------------------
    def stats(self, p: Principal) -> dict:
        quota = self.settings.quotas.get(p.tenant)
        mine = {
            "tenant": p.tenant,
            "bytes": self.store.tenant_bytes(p.tenant),
            "quota_bytes": quota,
            "models": len(self.registry.models_of(p.tenant)),
        }
        if not p.is_admin:
            return mine
        s = self.store.stats()
        s["tenant"] = mine
        s["tenants"] = {t: {"bytes": b, "quota_bytes": self.settings.quotas.get(t)} for t, b in s.pop("tenant_bytes").items()}
        s["models"] = len(self.registry.all_specs())
        return s

    def events(self, p: Principal, after: int = 0, limit: int = 1000) -> dict:
        """Events with id > ``after``: all of them (storage keys, the store's ids) for an admin; a
        tenant's own (client keys) otherwise, numbered in the tenant's own sequence, so that neither
        the ids nor ``next_after`` move when another tenant's blocks come and go."""
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise BadRequest("after must be a non-negative integer", field="after")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= self.settings.max_events_per_request:
            raise BadRequest(f"limit must be an integer in [1, {self.settings.max_events_per_request}]", field="limit")
        if not p.is_admin:
            with self._lock:
                self._ingest_events()
                mine = self._tenant_events.get(p.tenant, ())
                first = mine[0][0] if mine else 0
                out: list[dict] = []
                for i in range(max(0, after - first + 1), len(mine)):  # sequence numbers are consecutive
                    seq, ev, ckey = mine[i]
                    out.append(
                        {
                            "id": seq,
                            "kind": ev.kind,
                            "key": ckey.hex(),
                            "tier": ev.tier,
                            "model": self.registry.model_of_short_fingerprint(ev.model),
                            "time": ev.time,
                        }
                    )
                    if len(out) >= limit:
                        break
            return {"events": out, "next_after": out[-1]["id"] if out else after}
        out = []
        cursor = after
        for ev in self.store.events(after=after, limit=limit):
            cursor = ev.id
            owner = self._owners.get(ev.key)
            out.append(
                {
                    "id": ev.id,
                    "kind": ev.kind,
                    "key": ev.key.hex(),
                    "tier": ev.tier,
                    "model": self.registry.model_of_short_fingerprint(ev.model),
                    "time": ev.time,
                    "tenant": owner[0] if owner else None,
                }
            )
        return {"events": out, "next_after": cursor}

    def _ingest_events(self) -> None:
        """Route the store's new events to their owners' streams (under self._lock)."""
        cap = self.settings.max_events
        while True:
            batch = self.store.events(after=self._events_ingested, limit=10_000)
            if not batch:
                return
            for ev in batch:
                owner = self._owners.get(ev.key)
                if owner is not None:
                    tenant, ckey = owner
                    seq = self._tenant_seq[tenant] = self._tenant_seq.get(tenant, 0) + 1
                    q = self._tenant_events.get(tenant)
                    if q is None:
                        q = self._tenant_events[tenant] = deque(maxlen=cap)
                    q.append((seq, ev, ckey))
            self._events_ingested = batch[-1].id

    # -- health ----------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, str]]:
        tiers = self.probe.check()
        return all(v == "ok" for v in tiers.values()), tiers

    def close(self) -> None:
        if self.kv_events is not None:
            self.kv_events.close()
        self._stop.set()
        if self._retrier is not None:
            self._retrier.join(timeout=10)
        self.probe.close()
        if self.settings.flush_on_close:  # acknowledged blocks in memory tiers: found again at the next start
            t0 = time.monotonic()
            done = self.store.flush_to_persistent()
            if done["flushed"] or done["failed"]:
                (log.warning if done["failed"] else log.info)(
                    "flushed %d block(s) from memory to disk in %.1fs; %d could not be written (disk full or failing)",
                    done["flushed"],
                    time.monotonic() - t0,
                    done["failed"],
                )
        self.store.close()


def parse_client_key(value: Any, field: str) -> bytes:
    """A 32-byte key from 64 hex characters (REST) or 32 raw bytes (gRPC); BadRequest otherwise."""
    if isinstance(value, str):
        if len(value) != 64:
            raise BadRequest(f"{field} must be 64 hex characters (a 32-byte hash), got {len(value)} characters", field=field)
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise BadRequest(f"{field} must be 64 hex characters (a 32-byte hash)", field=field) from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) != 32:
            raise BadRequest(f"{field} must be a 32-byte hash, got {len(value)} bytes", field=field)
        return bytes(value)
    raise BadRequest(f"{field} must be a 64-character hex string, got {type(value).__name__}", field=field)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in JSON): no UTF-8 form, so no namespace bytes
        return False


def _spec_error_field(message: str) -> str:
    for name in _SPEC_FIELDS:
        if name in message:
            return f"spec.{name}"
    return "spec"


def open_service(settings: Settings, metrics_factory=None) -> KVService:
    """The store, registry and service for ``settings`` (the disk tier's directory is created)."""
    from .storebuild import build_store

    blocks_dir(settings).mkdir(parents=True, exist_ok=True)
    registry = SpecRegistry(
        settings.data_dir / "specs.json" if settings.disk_capacity_bytes else None, settings.max_specs, settings.max_specs_per_tenant
    )
    late: list = []  # the service's own reaction to other instances' deletes and rewrites, once it exists
    store = build_store(settings, on_invalidate=lambda keys, deleted: [f(keys, deleted) for f in late])
    svc = KVService(settings, store, registry)
    late.append(svc.invalidated)
    if metrics_factory is not None:
        svc.metrics = metrics_factory(svc)
    return svc
