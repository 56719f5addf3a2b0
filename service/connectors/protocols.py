"""What the transformers connector asks of the attention-level features it can run.

``AttentionHook`` (e.g. ``SparseDecode``) changes how attention is computed while it is attached;
``TokenPolicyRuntime`` (e.g. ``TokenPolicy``) runs a whole greedy generation under a token budget.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch


class AttentionHook(Protocol):
    def attach(self, model) -> contextlib.AbstractContextManager: ...  # used around forward calls


class TokenPolicyRuntime(Protocol):
    def generate(self, model, input_ids: list[int], *, max_new_tokens: int,
                 prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None, num_prefix_tokens: int) -> list[int]: ...
