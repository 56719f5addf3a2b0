"""kvtier: a standalone KV-cache tier for long-context LLM serving.

One import package. Its rooms (each a top-level folder of the source tree, installed under ``kvtier.``):

- ``kvtier.kvstore``: the block store (specs, keys, frames, codecs, tiers, the prefix index, ``TieredStore``);
- ``kvtier.eviction``: block policies (which block leaves a tier) and token policies (which tokens stay);
- ``kvtier.retrieval``: summaries, key indexes and selectors that turn a query into token/page ids;
- ``kvtier.sparse_attn``: Triton kernels, their torch references, and the dispatching attention API;
- ``kvtier.service``: the REST and gRPC service, its settings, its client SDK and the ``kvtier`` CLI;
- ``kvtier.connectors``: engine-side code (the transformers cache, ``generate()``, the vLLM connector).

Imports go one way: ``{service, connectors} -> {eviction, retrieval, sparse_attn} -> kvstore``.
The few names most programs need are importable from here (lazily: ``import kvtier`` loads nothing heavy)::

    from kvtier import KVSpec, TieredStore, TierConfig, chain_hashes
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first use)
_PUBLIC = {
    "KVSpec": "kvtier.kvstore",
    "Namespace": "kvtier.kvstore",
    "TieredStore": "kvtier.kvstore",
    "TierConfig": "kvtier.kvstore",
    "chain_hashes": "kvtier.kvstore",
    "get_codec": "kvtier.kvstore",
    "sparse_decode": "kvtier.sparse_attn",
    "merge_states": "kvtier.sparse_attn",
    "KVTierClient": "kvtier.service.client",
    "AsyncKVTierClient": "kvtier.service.client",
}

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
