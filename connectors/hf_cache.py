"""``KVTierCache``: a Hugging Face transformers cache whose full blocks live in kvtier.

A ``DynamicCache`` (batch 1) that, on a new request, asks kvtier for the longest cached prefix of
the prompt, loads those blocks into its layers and tells the caller how many tokens it holds, so
that only the rest is prefilled; after each forward call ``save()`` writes every block that has
completed since (prompt or generated tokens alike). Only full blocks are ever saved: a trailing
partial block stays in the cache only. At least the last prompt token is always left uncached, so
that the prefill yields the logits of the first new token.

    cache = KVTierCache(model, kv=store, spec=kv_spec(model))         # or kv=KVTierClient(...)
    n = cache.load_prefix(prompt_ids)                 # tokens loaded from kvtier (a multiple of block_tokens)
    out = model(input_ids=ids[:, n:], past_key_values=cache, use_cache=True)
    cache.save()                                      # the prompt's new full blocks
    cache.append_tokens([tok]); model(input_ids=[[tok]], past_key_values=cache); cache.save()   # decode
    cache.stats                                       # CacheStats: hits and bytes per tier, blocks saved

Keys are the chained ``BlockHash`` of DESIGN.md over ``spec`` and the namespace (tenant, cache
salt, extra keys): a block is reused only under the same model spec, namespace and whole prefix.
Blocks are stored in the spec's dtype (``float16`` by default, the serving precision) and loaded
back in the model's dtype; give a ``float32`` spec to keep a ``float32`` model's KV exact.

It also works under ``model.generate``: after ``load_prefix`` pass the whole prompt with
``past_key_values=cache`` (transformers prefills only the uncached tail), then
``cache.append_tokens(new_ids[:-1])`` and ``cache.save()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvtier.kvstore import BlockHash, KVSpec, chain_hashes

from .backends import KVBackend, PrefixMatch, ServiceBackend, StoreBackend, make_backend
from .hf_dispatch import model_dims

__all__ = ["CacheStats", "KVBackend", "KVTierCache", "PrefixMatch", "ServiceBackend", "StoreBackend", "model_spec"]


def _text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _cache_shape(model) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers causal LM's cache."""
    d = model_dims(model)
    return d.num_layers, d.num_kv_heads, d.head_dim


def model_spec(model, *, model_id: str | None = None, block_tokens: int = 256, dtype: str = "float16") -> KVSpec:
    """The ``KVSpec`` of a model's cache; ``model_id`` names the weights (default: ``config.name_or_path``).

    Blocks of two specs never share a key, so ``model_id`` must name the weights, not a local path
    that differs from machine to machine when blocks are shared (the reference model has its own:
    ``kvtier.refmodel.kv_spec``).
    """
    model_id = model_id or getattr(_text_config(model), "name_or_path", "") or getattr(getattr(model, "config", None), "name_or_path", "")
    if not model_id:
        raise ValueError(
            "the model has no name (config.name_or_path is empty): give model_id= or a spec, so that two models never share blocks"
        )
    num_layers, kv_heads, head_dim = _cache_shape(model)
    return KVSpec(model_id, num_layers, kv_heads, head_dim, dtype, block_tokens)


def _token_list(token_ids, what: str = "token_ids") -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() == 2 and token_ids.shape[0] == 1:
            token_ids = token_ids[0]
        if token_ids.dim() != 1 or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise ValueError(f"{what} must be integer token ids [T] or [1, T], got {token_ids.dtype} {list(token_ids.shape)}")
        return token_ids.tolist()
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 1 or token_ids.dtype.kind not in "iu":
            raise ValueError(f"{what} must be integer token ids [T], got {token_ids.dtype} {list(token_ids.shape)}")
        return token_ids.tolist()
    if not isinstance(token_ids, (list, tuple)):
        raise ValueError(f"{what} must be a list of integer token ids, got {type(token_ids).__name__}")
    for i, t in enumerate(token_ids):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"{what}[{i}] must be an integer token id, got {type(t).__name__}")
        if not 0 <= t < 1 << 32:
            raise ValueError(f"{what}[{i}] = {t} is outside [0, 2**32)")
    return [int(t) for t in token_ids]


@dataclass
class CacheStats:
    """What one request (or, summed with ``+``, several) got from and gave to kvtier."""

    num_lookup_blocks: int = 0  # full blocks of the prompt that could be loaded (the last prompt token stays out)
    num_hit_blocks: int = 0  # of those, the longest cached prefix
    num_loaded_blocks: int = 0  # blocks loaded into the cache (the hits, unless one vanished between lookup and get)
    num_cached_tokens: int = 0  # tokens loaded: num_loaded_blocks * block_tokens
    num_saved_blocks: int = 0  # blocks written (new full blocks of the prompt and of the generated tokens)
    saved_bytes: int = 0  # their bytes in the spec's dtype
    tier_hits: dict[str, int] = field(default_factory=dict)  # loaded blocks per tier that served them
    tier_bytes: dict[str, int] = field(default_factory=dict)  # loaded bytes (spec dtype) per tier
    lookup_s: float = 0.0
    load_s: float = 0.0  # get + copy into the cache layers
    save_s: float = 0.0

    def __add__(self, other: "CacheStats") -> "CacheStats":
        out = CacheStats()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, dict):
                merged = dict(a)
                for k, v in b.items():
                    merged[k] = merged.get(k, 0) + v
                setattr(out, f.name, merged)
            else:
                setattr(out, f.name, a + b)
        return out

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class KVTierCache(DynamicCache):
    """A transformers ``DynamicCache`` (batch 1) backed by kvtier; see the module docstring.

    Args:
        model: the transformers causal LM this cache serves (its config gives the layers, its
            first parameter the dtype and device the blocks are loaded in).
        kv: where the blocks live: a ``kvstore.TieredStore`` in this process, a
            ``service.client.KVTierClient`` of a running service, or any ``KVBackend``.
        store / client / backend: deprecated spellings of ``kv`` (at most one of the four).
        spec: the ``KVSpec`` of the blocks (default ``model_spec(model)``); its layers, KV heads
            and head dim must be the model's.
        tenant, salt, extra_keys: the namespace of the keys (``tenant`` in process only: the
            service takes it from the API key).
        save: write completed blocks on ``save()`` (False: only read from kvtier).
    """

    def __init__(
        self,
        model,
        *,
        kv=None,
        store=None,
        client=None,
        backend: KVBackend | None = None,
        spec: KVSpec | None = None,
        tenant: str = "",
        salt: str = "",
        extra_keys: Sequence[str] = (),
        save: bool = True,
    ) -> None:
        super().__init__(config=model.config)
        if any(type(layer) is not DynamicLayer for layer in self.layers):
            raise ValueError("KVTierCache caches full-attention layers only; this model has sliding-window or chunked layers")
        if spec is None:
            given = next((x for x in (kv, backend) if isinstance(x, KVBackend)), None)
            spec = given.spec if given is not None else model_spec(model)
        if not isinstance(spec, KVSpec):
            raise ValueError(f"spec must be a kvstore.KVSpec, got {type(spec).__name__}")
        shape = _cache_shape(model)
        if (spec.num_layers, spec.num_kv_heads, spec.head_dim) != shape:
            raise ValueError(
                f"spec {spec.model_id!r} has (num_layers, num_kv_heads, head_dim) = "
                f"{(spec.num_layers, spec.num_kv_heads, spec.head_dim)}, the model has {shape}"
            )
        self.backend = make_backend(
            spec, kv=kv, store=store, client=client, backend=backend, tenant=tenant, salt=salt, extra_keys=extra_keys
        )
        if self.backend.spec != spec:
            raise ValueError(f"the backend's spec {self.backend.spec} is not the cache's {spec}")
        self.spec = spec
        self.save_enabled = bool(save)
        param = next(model.parameters())
        self.model_dtype, self.model_device = param.dtype, param.device
        self.stats = CacheStats()
        self._token_ids: list[int] = []
        self._keys: list[bytes] = []  # keys of blocks 0, 1, ... as far as known
        self._num_saved = 0  # blocks 0 .. _num_saved - 1 are in kvtier (loaded or saved)
        self._started = False

    # -- tokens ---------------------------------------------------------------------------
    @property
    def token_ids(self) -> list[int]:
        """The token ids whose KV the cache holds or is about to hold (the prompt, then each token fed)."""
        return list(self._token_ids)

    @property
    def num_saved_tokens(self) -> int:
        return self._num_saved * self.spec.block_tokens

    def append_tokens(self, token_ids) -> None:
        """Tell the cache the ids of tokens the next forward call feeds (generated tokens, during decode)."""
        if not self._started:
            raise ValueError("call load_prefix(prompt_ids) first: the cache must know the prompt")
        self._token_ids += _token_list(token_ids)

    # -- load -----------------------------------------------------------------------------
    def load_prefix(self, prompt_ids) -> int:
        """Look up the prompt's longest cached prefix, load it, and return its length in tokens.

        The caller then prefills ``prompt_ids[n:]`` (never empty). ``prompt_ids``: ``[T]`` or ``[1, T]``.
        """
        ids = _token_list(prompt_ids, "prompt_ids")
        if not ids:
            raise ValueError("prompt_ids is empty: a request needs at least one token")
        if self._started or self.get_seq_length():
            raise ValueError("load_prefix starts a request: this cache already holds one (make a new KVTierCache)")
        bt = self.spec.block_tokens
        usable = (len(ids) - 1) // bt  # keep the last prompt token out: its logits start the answer
        t0 = time.perf_counter()
        found = self.backend.match(ids[: usable * bt])
        if len(found.keys) != usable or not 0 <= found.num_blocks <= usable:
            raise RuntimeError(f"the backend matched {found.num_blocks} of {len(found.keys)} keys for {usable} blocks")
        t1 = time.perf_counter()
        blocks = self.backend.get(found.keys[: found.num_blocks]) if found.num_blocks else []
        n = next((i for i, b in enumerate(blocks) if b is None), len(blocks))  # a block may vanish after the lookup
        if n:
            self._fill(torch.stack(blocks[:n]))
        t2 = time.perf_counter()
        self._token_ids = ids
        self._keys = list(found.keys)
        self._num_saved = n
        self._started = True
        s = self.stats
        s.num_lookup_blocks += usable
        s.num_hit_blocks += found.num_blocks
        s.num_loaded_blocks += n
        s.num_cached_tokens += n * bt
        hits = _drop_slowest(found.tier_hits, found.num_blocks - n)
        for tier, count in hits.items():
            s.tier_hits[tier] = s.tier_hits.get(tier, 0) + count
            s.tier_bytes[tier] = s.tier_bytes.get(tier, 0) + count * self.spec.block_nbytes
        s.lookup_s += t1 - t0
        s.load_s += t2 - t1
        return n * bt

    def _fill(self, blocks: torch.Tensor) -> None:
        """Load ``blocks`` ``[N, L, 2, H_kv, block_tokens, D]`` into the empty layers as tokens ``0 .. N*block_tokens``."""
        n, num_layers, _, h, bt, d = blocks.shape
        kv = blocks.permute(1, 2, 3, 0, 4, 5).reshape(num_layers, 2, h, n * bt, d)  # [L, 2, H_kv, T, D]
        kv = kv.to(device=self.model_device, dtype=self.model_dtype)
        for i, layer in enumerate(self.layers):
            layer.lazy_initialization(kv[i, 0:1], kv[i, 1:2])
            layer.keys = kv[i, 0].unsqueeze(0).contiguous()  # [1, H_kv, T, D]
            layer.values = kv[i, 1].unsqueeze(0).contiguous()

    # -- save -----------------------------------------------------------------------------
    def save(self) -> int:
        """Write every full block completed since the last save; returns how many were written."""
        if not self._started:
            raise ValueError("call load_prefix(prompt_ids) first: the cache must know the prompt")
        held = self.get_seq_length()
        if held > len(self._token_ids):
            raise ValueError(
                f"the cache holds {held} tokens but knows the ids of {len(self._token_ids)}: "
                "call append_tokens() with each token before the forward call that feeds it"
            )
        bt = self.spec.block_tokens
        end = held // bt
        if not self.save_enabled or end <= self._num_saved:
            return 0
        t0 = time.perf_counter()
        start = self._num_saved
        keys = self._keys_until(end)
        blocks = self.read_blocks(start, end)
        stored = self.backend.put(keys[start:end], blocks, parent=keys[start - 1] if start else None)
        self._num_saved = end
        num = sum(map(bool, stored))
        self.stats.num_saved_blocks += num
        self.stats.saved_bytes += num * self.spec.block_nbytes
        self.stats.save_s += time.perf_counter() - t0
        return num

    def _keys_until(self, end: int) -> list[bytes]:
        bt = self.spec.block_tokens
        if len(self._keys) < end:
            if self._keys:  # continue the chain from the last known key
                self._keys += chain_hashes(self.spec, self._token_ids[len(self._keys) * bt : end * bt], parent=BlockHash(self._keys[-1]))
            else:
                self._keys = list(self.backend.keys(self._token_ids[: end * bt]))
        return self._keys[:end]

    def read_blocks(self, start: int, end: int) -> torch.Tensor:
        """Blocks ``start .. end - 1`` of the cache as ``[N, L, 2, H_kv, block_tokens, D]`` in the spec's dtype, on the CPU."""
        bt = self.spec.block_tokens
        if not 0 <= start < end or end * bt > self.get_seq_length():
            raise ValueError(f"blocks [{start}, {end}) are not all in a cache of {self.get_seq_length()} tokens")
        if self.layers[0].keys.shape[0] != 1:
            raise ValueError(f"KVTierCache serves batch 1, the cache holds a batch of {self.layers[0].keys.shape[0]}")
        a, b = start * bt, end * bt
        kv = torch.stack([torch.stack((lay.keys[0, :, a:b], lay.values[0, :, a:b])) for lay in self.layers])  # [L, 2, H_kv, T, D]
        num_layers, _, h, _, d = kv.shape
        kv = kv.to(device="cpu", dtype=self.spec.torch_dtype).view(num_layers, 2, h, end - start, bt, d)
        return kv.permute(3, 0, 1, 2, 4, 5).contiguous()  # [N, L, 2, H_kv, bt, D]

    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The KV the cache holds, one ``(k, v)`` ``[1, H_kv, T, D]`` per layer (None when empty)."""
        if not self.get_seq_length():
            return None
        return [(lay.keys, lay.values) for lay in self.layers]


def _drop_slowest(tier_hits: dict[str, int], num: int) -> dict[str, int]:
    """``tier_hits`` less ``num`` blocks taken from the slowest tiers (blocks that vanished after the lookup)."""
    hits = dict(tier_hits)
    for tier in reversed(list(hits)):
        if num <= 0:
            break
        take = min(num, hits[tier])
        hits[tier] -= take
        num -= take
    return hits
