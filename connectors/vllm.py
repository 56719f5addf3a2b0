"""vLLM v1 KV-connector adapter: vLLM loads prompt prefixes from kvtier and saves new full blocks to it.

**Not yet run inside vLLM.** It is written against vLLM's documented connector interface
(``vllm.distributed.kv_transfer.kv_connector.v1.base.KVConnectorBase_V1``) and tested with a
fake of the engine side that follows the interface's call order (``tests/service/test_vllm_connector.py``).
When vLLM is installed the connector subclasses the real base class; without it, a stand-in
with the same method names (so this module imports, and is tested, where vLLM cannot run).
Importing ``kvstore`` or ``service`` never imports vLLM; only importing this module tries to.

Configuration, on the vLLM command line::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.connectors.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"url": "http://127.0.0.1:8080", "api_key": "...",
                                      "block_tokens": 256, "namespace": "prod"}}'

``kv_connector_extra_config`` keys (all optional; ``KVTierConnectorConfig``): ``url`` (a kvtier
service ``http(s)://host:port``, ``unix://PATH`` for its same-host shared-memory transport, or ``inprocess`` / ``inprocess://NAME`` for a ``TieredStore`` in
vLLM's own process), ``api_key`` (default: ``$KVTIER_API_KEY``), ``block_tokens`` (tokens per
kvtier block, a multiple of vLLM's ``--block-size``), ``namespace`` (a string in every key: engines
share blocks only under the same namespace), ``model_id`` (default: vLLM's model name),
``timeout_s``, ``layerwise`` (copy loaded KV into vLLM's buffer layer by layer in
``wait_for_layer_load``; default: all layers in ``start_load_kv``), ``paged_layout`` (``auto``:
from the shape; ``kv_first`` = ``[2, N, P, H_kv, D]`` as older vLLM FlashAttention backends allocate
it; ``blocks_first`` = ``[N, 2, P, H_kv, D]`` as FlashInfer and current FlashAttention do; HND
stride orders are the same logical shapes). ``kv_role``: ``kv_consumer`` only loads,
``kv_producer`` only saves, ``kv_both`` does both.

Block mapping: one kvtier block (``block_tokens`` tokens, all layers, ``[L, 2, H_kv, T, D]``)
covers ``r = block_tokens / P`` consecutive vLLM blocks of ``P`` tokens (``P`` = vLLM's block size);
a save gathers those r paged blocks of every layer into one kvtier block, a load scatters a
kvtier block back into r paged blocks. Keys are kvtier's chained ``BlockHash`` over the request's
token ids, under the model's ``KVSpec`` and a ``Namespace`` (salt: the request's ``cache_salt``;
extra keys: the configured namespace, the LoRA name, multimodal hashes).

Call order (the one vLLM documents, and the one the tests' fake engine follows):

- scheduler, per waiting request: ``get_num_new_matched_tokens(request, num_computed_tokens)``
  (kvtier's longest cached prefix, whole kvtier blocks only, never the whole prompt, minus what
  vLLM computed itself) -> ``update_state_after_alloc(request, blocks, num_external_tokens)``;
  per step: ``build_connector_meta(scheduler_output)`` -> ``KVTierConnectorMetadata`` listing per
  request the vLLM block ids to load from / save to which kvtier keys; when a request ends:
  ``request_finished(request, block_ids)``.
- worker, per step: ``bind_connector_metadata`` -> ``start_load_kv`` (fetches the blocks) -> per
  attention layer ``wait_for_layer_load`` and ``save_kv_layer`` (gathers the layer's part of each
  block to save) -> ``wait_for_save`` (writes the whole kvtier blocks) -> ``get_finished`` ->
  ``clear_connector_metadata``. Blocks that could not be loaded (evicted since the lookup, kvtier
  down) are reported by ``get_block_ids_with_load_errors`` so that vLLM recomputes them; kvtier
  being unreachable never fails a request (no hit, no save, a warning).

Limits: one KV-cache group of full-attention layers (no MLA, no hybrid models), tensor and
pipeline parallel size 1 (a kvtier block holds every KV head of every layer), ``kv_cache_dtype``
``auto``, synchronous loads and saves (``get_num_new_matched_tokens`` never answers "async").
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import os
import threading
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Protocol, Sequence

import torch

from kvtier.kvstore import FrameError, KVSpec, Namespace, TieredStore, chain_hashes
from kvtier.kvstore.spec import dtype_name

from .backends import ServiceBackend, StoreBackend

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
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore[import-not-found]
        KVConnectorBase_V1 as _Base,
        KVConnectorMetadata as _Metadata,
        KVConnectorRole,
    )

    HAS_VLLM = True
except ImportError:
    _Base, _Metadata, KVConnectorRole = _StandInBase, _StandInMetadata, _StandInRole  # type: ignore[misc,assignment]
    HAS_VLLM = False


# -- configuration ------------------------------------------------------------------------------
PAGED_LAYOUTS = ("auto", "kv_first", "blocks_first")


@dataclass(frozen=True)
class KVTierConnectorConfig:
    """The connector's part of vLLM's ``kv_transfer_config.kv_connector_extra_config``."""

    url: str = "inprocess"  # "http(s)://host:port" or "unix://PATH" (the service) or "inprocess[://NAME]" (a store in this process)
    api_key: str | None = None  # default: $KVTIER_API_KEY
    block_tokens: int = 256  # tokens per kvtier block; a multiple of vLLM's block size
    namespace: str = ""  # only engines with the same namespace share blocks
    model_id: str | None = None  # default: vLLM's model name
    timeout_s: float = 30.0
    layerwise: bool = False  # scatter loaded KV per layer in wait_for_layer_load (vLLM then needs piecewise CUDA graphs)
    paged_layout: str = "auto"  # "kv_first" [2, N, P, H, D], "blocks_first" [N, 2, P, H, D], or "auto" (from the shape)

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
        raise ValueError(f"the kvtier connector needs tensor_parallel_size=1 and pipeline_parallel_size=1 (a kvtier "
                         f"block holds every KV head of every layer), got {tp} and {pp}")
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


# -- paged layout <-> kvtier blocks -------------------------------------------------------------
def detect_layout(kv_layer: torch.Tensor) -> str:
    """``kv_first`` for ``[2, N, P, H, D]``, ``blocks_first`` for ``[N, 2, P, H, D]`` (ValueError if neither or both)."""
    if kv_layer.dim() != 5:
        raise ValueError(f"a paged KV layer must be 5-d ([2, N, P, H_kv, D] or [N, 2, P, H_kv, D]), got shape {list(kv_layer.shape)}")
    first, second = kv_layer.shape[0] == 2, kv_layer.shape[1] == 2
    if first != second:
        return "kv_first" if first else "blocks_first"
    raise ValueError(f"cannot tell the paged layout of shape {list(kv_layer.shape)}: set paged_layout to 'kv_first' or 'blocks_first'")


def paged_view(kv_layer: torch.Tensor, layout: str) -> torch.Tensor:
    """One layer of vLLM's paged KV as ``[2, N, P, H_kv, D]``: a view, so writes reach vLLM's buffer."""
    if kv_layer.dim() != 5:
        raise ValueError(f"a paged KV layer must be 5-d, got shape {list(kv_layer.shape)}")
    if layout == "kv_first":
        if kv_layer.shape[0] != 2:
            raise ValueError(f"a kv_first paged layer is [2, N, P, H_kv, D], got shape {list(kv_layer.shape)}")
        return kv_layer
    if layout == "blocks_first":
        if kv_layer.shape[1] != 2:
            raise ValueError(f"a blocks_first paged layer is [N, 2, P, H_kv, D], got shape {list(kv_layer.shape)}")
        return kv_layer.transpose(0, 1)
    raise ValueError(f"layout must be 'kv_first' or 'blocks_first', got {layout!r}")


def gather_layer(view: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """One layer of n kvtier blocks from the paged KV.

    view: ``[2, N, P, H_kv, D]`` (``paged_view``); block_ids: int64 ``[n, r]``, the r vLLM blocks
    of each kvtier block in token order. Returns ``[n, 2, H_kv, r * P, D]`` (a new tensor on view's device).
    """
    n, r = block_ids.shape
    _, _, P, H, D = view.shape
    x = view[:, block_ids.reshape(-1).to(view.device)]  # [2, n*r, P, H, D]
    return x.view(2, n, r, P, H, D).permute(1, 0, 4, 2, 3, 5).reshape(n, 2, H, r * P, D)


def scatter_layer(view: torch.Tensor, src: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Write one layer of n kvtier blocks into the paged KV (the inverse of ``gather_layer``).

    view: ``[2, N, P, H_kv, D]``; src: ``[n, 2, H_kv, r * P, D]`` (any device, view's dtype);
    block_ids: int64 ``[n, r]``, ``-1`` for a vLLM block to leave as it is.
    """
    n, r = block_ids.shape
    _, _, P, H, D = view.shape
    if tuple(src.shape) != (n, 2, H, r * P, D):
        raise ValueError(f"src must be [{n}, 2, {H}, {r * P}, {D}] for these block ids, got {list(src.shape)}")
    if src.dtype != view.dtype:
        raise ValueError(f"src dtype {src.dtype} differs from the paged KV's {view.dtype}")
    y = src.to(view.device, non_blocking=True).reshape(n, 2, H, r, P, D).permute(1, 0, 3, 4, 2, 5).reshape(2, n * r, P, H, D)
    flat = block_ids.reshape(-1)
    keep = flat >= 0
    if bool(keep.all()):
        view[:, flat.to(view.device)] = y
    else:
        view[:, flat[keep].to(view.device)] = y[:, keep.to(view.device)]


def paged_to_blocks(kv_layers: Sequence[torch.Tensor], block_ids: torch.Tensor, layout: str = "kv_first") -> torch.Tensor:
    """kvtier blocks ``[n, L, 2, H_kv, r * P, D]`` gathered from L paged layers at ``block_ids [n, r]``."""
    return torch.stack([gather_layer(paged_view(kv, layout), block_ids) for kv in kv_layers], dim=1)


def blocks_to_paged(blocks: torch.Tensor, kv_layers: Sequence[torch.Tensor], block_ids: torch.Tensor, layout: str = "kv_first") -> None:
    """Scatter kvtier blocks ``[n, L, 2, H_kv, r * P, D]`` into L paged layers at ``block_ids [n, r]`` (-1: skip)."""
    if blocks.dim() != 6 or blocks.shape[1] != len(kv_layers):
        raise ValueError(f"blocks must be [n, {len(kv_layers)}, 2, H_kv, T, D] for {len(kv_layers)} layers, got {list(blocks.shape)}")
    for l, kv in enumerate(kv_layers):
        scatter_layer(paged_view(kv, layout), blocks[:, l], block_ids)


# -- where the blocks live -----------------------------------------------------------------------
class KVTierBackend(Protocol):
    """The four calls the connector makes; a service client or a store of this process behind them."""

    spec: KVSpec

    def lookup(self, keys: Sequence[bytes]) -> int: ...  # longest cached prefix of the chain, in blocks

    def get(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]: ...  # [L, 2, H_kv, T, D] each, None: a miss

    def put(self, keys: Sequence[bytes], blocks: torch.Tensor, *, parent: bytes | None) -> list[bool]: ...

    def close(self) -> None: ...


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


def open_backend(config: KVTierConnectorConfig, spec: KVSpec) -> KVTierBackend:
    """The connector's backend (``connectors.backends``). A service is not asked anything
    before the first lookup (the spec is registered then, and again after a service restart), so an
    unreachable kvtier makes misses, never a failed engine start; 64 blocks and 64 MiB per request."""
    if config.url.startswith(("http://", "https://", "unix://")):  # unix://: the same-host shared-memory transport
        return ServiceBackend.connect(config.url, spec, api_key=config.api_key, timeout_s=config.timeout_s, register=False,
                                      max_blocks_per_request=64, max_request_bytes=64 << 20)
    name = config.url[len("inprocess://"):] if config.url.startswith("inprocess://") else "default"
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
    loads: list[BlockTransfer] = field(default_factory=list)  # kvtier -> paged KV, before the forward
    saves: list[BlockTransfer] = field(default_factory=list)  # paged KV -> kvtier, after it; a chain
    save_parent: bytes | None = None  # the key before saves[0] (None: saves[0] starts the chain)


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
    pending_load: tuple[int, int] | None = None  # token range [start, end) to load in the next step
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


# -- the connector --------------------------------------------------------------------------------
class KVTierConnector(_Base):  # type: ignore[misc,valid-type]
    """vLLM v1 KV connector backed by kvtier (see the module docstring for configuration and call order)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        if HAS_VLLM and "kv_cache_config" not in inspect.signature(_Base.__init__).parameters:
            super().__init__(vllm_config, role)  # vLLM before kv_cache_config was passed
        else:
            super().__init__(vllm_config, role, kv_cache_config)
        extra = getattr(self._kv_transfer_config, "kv_connector_extra_config", None) or {}
        self.config = KVTierConnectorConfig.from_extra_config(extra)
        self.spec, self.block_size = spec_from_vllm_config(vllm_config, self.config)
        self.blocks_per_kvtier_block = self.spec.block_tokens // self.block_size  # r
        kv_role = getattr(self._kv_transfer_config, "kv_role", None) or "kv_both"
        self.load_enabled = kv_role != "kv_producer"
        self.save_enabled = kv_role != "kv_consumer"
        self._backend: KVTierBackend | None = None
        self._errors = _backend_errors()
        self.stats = {"lookups": 0, "hit_blocks": 0, "loaded_blocks": 0, "saved_blocks": 0, "load_errors": 0, "backend_errors": 0}
        # scheduler side
        self._states: dict[str, _RequestState] = {}
        # worker side
        self._layout: str | None = None
        self._views: dict[str, torch.Tensor] = {}  # layer name -> [2, N, P, H_kv, D] view of vLLM's buffer
        self._layer_index: dict[str, int] = {}
        self._load_errors: set[int] = set()
        self._reset_step()

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict) -> bool:
        return bool((extra_config or {}).get("layerwise", False))  # wait_for_layer_load must run between layers

    @property
    def backend(self) -> KVTierBackend:
        if self._backend is None:
            self._backend = open_backend(self.config, self.spec)
        return self._backend

    def _call(self, what: str, fn: Callable, *args, default):
        """A backend call; kvtier failing (unreachable, refusing, a bad frame) is a miss, logged, never raised."""
        try:
            return fn(*args)
        except self._errors as e:
            self.stats["backend_errors"] += 1
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
            new_tokens = list(tokens[have * bt: num_blocks * bt])
            state.keys += chain_hashes(self.spec, new_tokens, state.namespace, parent=state.keys[-1] if have else None)
        return state.keys[:num_blocks]

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` that kvtier holds: whole kvtier blocks, never the whole prompt."""
        if not self.load_enabled:
            return 0, False
        tokens = _token_ids(request)
        if tokens is None:
            return 0, False
        state = self._state(request)
        bt = self.spec.block_tokens
        usable = (len(tokens) - 1) // bt  # vLLM must compute at least one token itself
        state.num_local_tokens, state.num_hit_blocks = num_computed_tokens, 0
        if usable * bt <= num_computed_tokens:
            return 0, False  # vLLM already has every block kvtier could give
        keys = self._keys(state, tokens, usable)
        hit = self._call("lookup", self.backend.lookup, keys, default=0)
        self.stats["lookups"] += 1
        self.stats["hit_blocks"] += hit
        state.num_hit_blocks = hit
        state.num_cached_blocks = max(state.num_cached_blocks, hit)
        return max(0, hit * bt - num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Remember the token range to load (decided by ``num_external_tokens``, not by ``blocks``)."""
        state = self._state(request)
        if num_external_tokens <= 0:
            state.pending_load = None
            return
        start = state.num_local_tokens
        end = start + num_external_tokens
        if end > state.num_hit_blocks * self.spec.block_tokens or start % self.block_size or end % self.block_size:
            raise RuntimeError(f"request {request.request_id}: vLLM allocated {num_external_tokens} external tokens after "
                               f"{start} local ones, but kvtier matched {state.num_hit_blocks * self.spec.block_tokens} "
                               f"tokens in blocks of {self.block_size}")
        state.pending_load = (start, end)

    def build_connector_meta(self, scheduler_output: Any) -> KVTierConnectorMetadata:
        """This step's loads and saves per request (reads ``scheduler_output``, never modifies it)."""
        meta = KVTierConnectorMetadata()
        for rid in getattr(scheduler_output, "finished_req_ids", None) or ():
            self._states.pop(rid, None)
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._states.get(new.req_id)
            if state is None:  # vLLM calls update_state_after_alloc for every request it schedules
                continue
            state.block_ids = _group0(new.block_ids)
            state.num_computed_tokens = new.num_computed_tokens + scheduled.get(new.req_id, 0)
            self._add_transfers(meta, new.req_id, state)
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
        return meta

    def _add_transfers(self, meta: KVTierConnectorMetadata, req_id: str, state: _RequestState) -> None:
        P, r, bt = self.block_size, self.blocks_per_kvtier_block, self.spec.block_tokens
        rt = RequestTransfers(req_id)
        if state.pending_load is not None:
            start, end = state.pending_load
            state.pending_load = None
            for b in range(start // bt, -(-end // bt)):
                ids = tuple(state.block_ids[b * r + j] if start <= (b * r + j) * P < end else -1 for j in range(r))
                rt.loads.append(BlockTransfer(state.keys[b], ids))
        tokens = _token_ids(state.request) if self.save_enabled else None
        if tokens is not None:
            # full blocks whose every token is computed once this step has run (spec-decode drafts are not in tokens)
            done = min(state.num_computed_tokens, len(tokens), len(state.block_ids) * P)
            num_full = done // bt
            if num_full > state.num_cached_blocks:
                keys = self._keys(state, tokens, num_full)
                first = state.num_cached_blocks
                rt.saves = [BlockTransfer(keys[b], tuple(state.block_ids[b * r: (b + 1) * r])) for b in range(first, num_full)]
                rt.save_parent = keys[first - 1] if first else None
                state.num_cached_blocks = num_full
        if rt.loads or rt.saves:
            meta.requests.append(rt)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Forget the request; its full blocks were saved as they completed, so vLLM may free them now."""
        self._states.pop(request.request_id, None)
        return False, None

    # ==== worker side =============================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """vLLM's paged KV per attention layer, in the model's order: kvtier's layer l is the l-th entry."""
        if len(kv_caches) != self.spec.num_layers:
            raise ValueError(f"the spec has {self.spec.num_layers} layers, vLLM registered {len(kv_caches)} KV caches")
        first = next(iter(kv_caches.values()))
        layout = self.config.paged_layout if self.config.paged_layout != "auto" else detect_layout(first)
        views, index = {}, {}
        for i, (name, kv) in enumerate(kv_caches.items()):
            view = paged_view(kv, layout)
            _, _, P, H, D = view.shape
            if (P, H, D) != (self.block_size, self.spec.num_kv_heads, self.spec.head_dim) or kv.dtype != self.spec.torch_dtype:
                raise ValueError(f"layer {name!r}: paged KV [2, N, P, H_kv, D] must have P={self.block_size}, "
                                 f"H_kv={self.spec.num_kv_heads}, D={self.spec.head_dim} and dtype {self.spec.dtype}, got "
                                 f"{list(view.shape)} {kv.dtype}")
            views[name], index[name] = view, i
        self._layout, self._views, self._layer_index = layout, views, index

    def _reset_step(self) -> None:
        self._load_src: torch.Tensor | None = None  # [m, L, 2, H_kv, T, D]
        self._load_ids: torch.Tensor | None = None  # [m, r]
        self._loaded_layers: set[str] = set()
        self._save_ids: torch.Tensor | None = None  # [s, r]
        self._save_buf: torch.Tensor | None = None  # [s, L, 2, H_kv, T, D] on the CPU
        self._save_plan: list[tuple[RequestTransfers, int, int]] = []  # (request, first row, rows)
        self._gathered_layers: set[str] = set()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Fetch this step's blocks from kvtier; copy them into the paged KV now (or per layer when layerwise)."""
        self._reset_step()
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        rows: list[tuple[int, ...]] = []
        for rt in meta.requests:
            if rt.saves:
                self._save_plan.append((rt, len(rows), len(rt.saves)))
                rows += [t.block_ids for t in rt.saves]
        if rows:
            self._save_ids = torch.tensor(rows, dtype=torch.int64)
        wanted = list(dict.fromkeys(t.key for rt in meta.requests for t in rt.loads))
        if not wanted:
            return
        got = self._call("get", self.backend.get, wanted, default=[None] * len(wanted))
        by_key = dict(zip(wanted, got))
        srcs, ids = [], []
        for rt in meta.requests:
            failed = False
            for t in rt.loads:
                block = by_key.get(t.key)
                if failed or block is None:  # a missing block ends the usable prefix: vLLM recomputes from here
                    failed = True
                    self._load_errors.update(b for b in t.block_ids if b >= 0)
                    self.stats["load_errors"] += 1
                    continue
                srcs.append(block)
                ids.append(t.block_ids)
        if not srcs:
            return
        devices = {s.device for s in srcs}
        self._load_src = torch.stack(srcs if len(devices) == 1 else [s.cpu() for s in srcs])
        self._load_ids = torch.tensor(ids, dtype=torch.int64)
        self.stats["loaded_blocks"] += len(srcs)
        if not self.config.layerwise:
            for name in self._views:
                self._scatter(name)

    def _scatter(self, layer_name: str) -> None:
        scatter_layer(self._views[layer_name], self._load_src[:, self._layer_index[layer_name]], self._load_ids)
        self._loaded_layers.add(layer_name)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._load_src is not None and layer_name in self._views and layer_name not in self._loaded_layers:
            self._scatter(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Gather this layer's part of every block to save (the layer's KV for this step is written by now)."""
        if self._save_ids is None or layer_name not in self._layer_index or layer_name in self._gathered_layers:
            return
        self._gather(layer_name, paged_view(kv_layer, self._layout))

    def _gather(self, layer_name: str, view: torch.Tensor) -> None:
        if self._save_buf is None:
            self._save_buf = torch.empty(len(self._save_ids), *self.spec.block_shape, dtype=self.spec.torch_dtype)
        self._save_buf[:, self._layer_index[layer_name]].copy_(gather_layer(view, self._save_ids))
        self._gathered_layers.add(layer_name)

    def wait_for_save(self) -> None:
        """Write this step's new full blocks (a kvtier block holds every layer, so it is written once all are gathered)."""
        if self._save_ids is None:
            return
        for name, view in self._views.items():  # layers whose save_kv_layer vLLM skipped: read the buffer directly
            if name not in self._gathered_layers:
                self._gather(name, view)
        for rt, row, n in self._save_plan:
            keys = [t.key for t in rt.saves]
            stored = self._call("put", functools.partial(self.backend.put, parent=rt.save_parent), keys, self._save_buf[row: row + n],
                                default=[])
            self.stats["saved_blocks"] += sum(bool(s) for s in stored)
        self._save_ids, self._save_buf, self._save_plan = None, None, []

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None  # loads and saves are synchronous: nothing finishes later

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
