"""eviction: which blocks leave a tier (``eviction.blocks``) and which tokens leave a sequence."""

from .blocks import (
    BlockPolicy,
    CostAwarePolicy,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    TenantFairPolicy,
    available_policies,
    get_policy,
    register_policy,
)

__all__ = [
    "BlockPolicy",
    "CostAwarePolicy",
    "FIFOPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "S3FIFOPolicy",
    "TenantFairPolicy",
    "available_policies",
    "get_policy",
    "register_policy",
]
