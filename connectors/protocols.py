"""The two extension points of ``generate()`` (service/connectors/generate.py), as protocols.

Both are implemented elsewhere (the sparse-decode and token-eviction runtimes); ``generate`` only
calls them. They are structural (``typing.Protocol``): any object with the method fits.

- ``AttentionHook``: ``attach(model)`` returns a context manager that ``generate`` enters once
  around every forward call of a request (the prefill of the uncached part and each decode step).
  Inside it the object may route the model's attention wherever it likes, e.g. register a
  transformers attention function that runs kvtier's sparse decode for single-token queries and
  full attention otherwise. On exit the model must be as it was.
- ``TokenPolicyRuntime``: runs a whole request itself. ``generate`` looks up the prompt's cached prefix,
  loads it (and prefills and saves the uncached full blocks, so that the next request finds them),
  then hands the policy the prefix KV; the policy prefills the rest of the prompt under its own
  cache (evicting tokens as it likes) and returns the generated token ids.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class AttentionHook(Protocol):
    def attach(self, model) -> AbstractContextManager:
        """A context manager; ``generate`` runs every forward call of the request inside it."""
        ...


@runtime_checkable
class TokenPolicyRuntime(Protocol):
    def generate(
        self,
        model,
        input_ids: list[int],
        *,
        max_new_tokens: int,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
        num_prefix_tokens: int,
    ) -> list[int]:
        """Generate up to ``max_new_tokens`` token ids after the prompt ``input_ids`` (the whole prompt).

        ``prefix_kv``: the KV of the prompt's first ``num_prefix_tokens`` tokens, one ``(k, v)`` per
        layer, each ``[1, H_kv, num_prefix_tokens, D]`` in the model's dtype and on its device
        (positions ``0 .. num_prefix_tokens - 1``, RoPE applied); ``None`` when ``num_prefix_tokens``
        is 0. The policy prefills ``input_ids[num_prefix_tokens:]`` (at least one token) on top of it.
        """
        ...
