"""Token eviction: which tokens of a sequence leave the fast tier, per layer and KV head.

A scorer (``get_scorer(name, **options)``; ``available_scorers()``) rates every cached token;
one ``Compressor`` keeps the best under a budget, always with the attention sinks and the recent
window. ``gather_kv`` applies a selection (``drop`` mode); ``evicted_ids`` names what ``demote``
mode moves to a lower tier. ``EvictingKV`` runs a sequence's cache under a budget in ``drop`` or
``demote`` mode (recall through a selector, ``sparse_decode`` and an LSE merge). ``HeadProfiler`` / ``HeadProfile`` classify heads as retrieval or
streaming (DuoAttention-style).
"""

from . import scorers  # noqa: F401  (registers the built-in scorers)
from .base import ScoreInputs, Scorer, ScorerBase, available_scorers, get_scorer, register_scorer, window_attention
from .compress import Compressor, evicted_ids, gather_kv
from .heads import HeadProfile, HeadProfiler, mass_outside
from .runtime import EvictingKV, EvictionStats
from .scorers import (
    ExpectedAttentionScorer,
    H2OScorer,
    KeyNormScorer,
    PyramidKVScorer,
    SnapKVScorer,
    StreamingLLMScorer,
    TOVAScorer,
)

__all__ = [
    "Compressor",
    "EvictingKV",
    "EvictionStats",
    "ExpectedAttentionScorer",
    "H2OScorer",
    "HeadProfile",
    "HeadProfiler",
    "KeyNormScorer",
    "PyramidKVScorer",
    "ScoreInputs",
    "Scorer",
    "ScorerBase",
    "SnapKVScorer",
    "StreamingLLMScorer",
    "TOVAScorer",
    "available_scorers",
    "evicted_ids",
    "gather_kv",
    "get_scorer",
    "mass_outside",
    "register_scorer",
    "window_attention",
]
