"""Block eviction policies: which block leaves one tier.

``get_policy(name, **options)`` makes a policy; ``available_policies()`` lists the names:
``lru``, ``fifo``, ``lfu``, ``s3fifo``, ``cost``, ``tenant_fair``. The protocol and its
contract are in ``eviction.blocks.base``.
"""

from .base import BlockPolicy, PolicyBase, available_policies, get_policy, register_policy
from .cost import CostAwarePolicy
from .lfu import LFUPolicy
from .recency import FIFOPolicy, LRUPolicy
from .s3fifo import S3FIFOPolicy
from .tenant_fair import TenantFairPolicy

__all__ = [
    "BlockPolicy",
    "CostAwarePolicy",
    "FIFOPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "PolicyBase",
    "S3FIFOPolicy",
    "TenantFairPolicy",
    "available_policies",
    "get_policy",
    "register_policy",
]
