"""Running kvtier's attention inside a transformers model: one registered function per mode.

transformers (5.x) looks attention up by name (``config._attn_implementation`` in
``AttentionInterface``) and calls it as ``fn(module, query, key, value, attention_mask, dropout=,
scaling=, **kwargs)`` with ``query [B, H_q, n, D]`` and ``key, value [B, H_kv, T, D]`` (the whole
cached K/V after the cache's update) and expects ``(out [B, n, H_q, D], weights or None)``.

kvtier registers each of its functions once per process (a library such as kvpress wraps the
registered functions when it is imported, so registering again would leave its wrapper calling a
stale one); the registered function only dispatches to the handler bound to the calling attention
module. ``bind(model, name, handler)`` binds a handler to every attention module of the model,
switches the model to ``name`` and restores both on exit; with ``capture_cache=True`` a forward
pre-hook on each attention module hands the handler the call's ``past_key_values`` (the cache
object: per-request state is keyed by it) and ``cache_position``.

Handlers are called as ``handler(module, query, key, value, attention_mask, cache=,
cache_position=, scaling=, **kwargs)``.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

_HANDLERS: "weakref.WeakKeyDictionary[torch.nn.Module, Callable]" = weakref.WeakKeyDictionary()
_CALLS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, Any]]" = weakref.WeakKeyDictionary()
_REGISTERED: set[str] = set()
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelDims:
    """The attention geometry of a causal LM (read from its config)."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


def model_dims(model) -> ModelDims:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):  # multimodal configs hold the LM's in a sub-config
        cfg = cfg.get_text_config(decoder=True)
    if cfg is None or not hasattr(cfg, "num_hidden_layers") or not hasattr(cfg, "num_attention_heads"):
        raise ValueError(f"model must be a transformers causal LM with a config, got {type(model).__name__}")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelDims(cfg.num_hidden_layers, heads, kv_heads, head_dim)


def attention_modules(model) -> list[torch.nn.Module]:
    """The model's attention modules, one per layer, in layer order (modules with an int ``layer_idx``
    and ``num_key_value_groups``: the transformers convention for decoder attention)."""
    dims = model_dims(model)
    mods = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "num_key_value_groups")]
    mods.sort(key=lambda m: m.layer_idx)
    if [m.layer_idx for m in mods] != list(range(dims.num_layers)):
        raise ValueError(
            f"expected one attention module per layer (layer_idx 0..{dims.num_layers - 1}) in a transformers "
            f"causal LM, found layer_idx {[m.layer_idx for m in mods]}"
        )
    return mods


def _dispatch(module, query, key, value, attention_mask, *args, **kwargs):
    handler = _HANDLERS.get(module)
    if handler is None:
        raise RuntimeError(
            f"a kvtier attention function ran outside its attach() block (module {type(module).__name__}); "
            "use the hook's context manager around the forward calls"
        )
    if args:  # some wrappers (kvpress) pass dropout, then scaling, positionally
        kwargs.setdefault("dropout", args[0])
        if len(args) > 1:
            kwargs.setdefault("scaling", args[1])
    cache, cache_position = _CALLS.get(module, (None, None))
    return handler(module, query, key, value, attention_mask, cache=cache, cache_position=cache_position, **kwargs)


def register(name: str, *, sdpa_mask: bool) -> None:
    """Register ``name`` in transformers' ``AttentionInterface`` once per process; with
    ``sdpa_mask`` the model builds SDPA masks for it (prefill through SDPA needs them), otherwise
    none (the handler manages causality itself)."""
    with _LOCK:
        if name in _REGISTERED:
            return
        from transformers import AttentionInterface

        AttentionInterface.register(name, _dispatch)
        if sdpa_mask:
            from transformers import AttentionMaskInterface
            from transformers.masking_utils import sdpa_mask as mask_fn

            AttentionMaskInterface.register(name, mask_fn)
        _REGISTERED.add(name)


def _capture(module, args, kwargs):
    _CALLS[module] = (kwargs.get("past_key_values"), kwargs.get("cache_position"))


@contextlib.contextmanager
def bind(model, name: str, handler: Callable, *, sdpa_mask: bool, capture_cache: bool = False) -> Iterator[None]:
    """Route the model's attention to ``handler`` under the registered name ``name`` until exit."""
    mods = attention_modules(model)
    register(name, sdpa_mask=sdpa_mask)
    with _LOCK:
        if any(m in _HANDLERS for m in mods):
            raise ValueError("this model already has a kvtier attention hook attached; exit that block first")
        for m in mods:
            _HANDLERS[m] = handler
    hooks = [m.register_forward_pre_hook(_capture, with_kwargs=True) for m in mods] if capture_cache else []
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(name)
        yield
    finally:
        model.set_attn_implementation(previous)
        for h in hooks:
            h.remove()
        with _LOCK:
            for m in mods:
                _HANDLERS.pop(m, None)
                _CALLS.pop(m, None)


def sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' own SDPA attention (the dense path of every kvtier mode)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("cache", None)
    kwargs.pop("cache_position", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
