"""retrieval: block summaries, key indexes per (layer, KV head), selectors that turn a decode
query into the token ids ``sparse_decode`` attends, and store-level retrieval across tiers."""

from .index import KeyIndex, available_indexes, gpu_available, make_index, register_index
from .selectors import (
    CachedSelector,
    Selector,
    SelectorBase,
    available_selectors,
    get_selector,
    mask_to_ids,
    register_selector,
)
from .store_api import RetrievalResult, StoreRetriever
from .summaries import BlockSummary, SummaryStore, page_bounds, quest_scores, summarize_block

__all__ = [
    "BlockSummary",
    "CachedSelector",
    "KeyIndex",
    "RetrievalResult",
    "Selector",
    "SelectorBase",
    "StoreRetriever",
    "SummaryStore",
    "available_indexes",
    "available_selectors",
    "get_selector",
    "gpu_available",
    "make_index",
    "mask_to_ids",
    "page_bounds",
    "quest_scores",
    "register_index",
    "register_selector",
    "summarize_block",
]
