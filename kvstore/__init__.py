"""kvstore: the block store — specs, keys, frames, codecs, tiers, the prefix index, TieredStore."""

from .codecs import Codec, available_codecs, get_codec, register_codec
from .frames import Frame, FrameError, decode_frame, encode_frame
from .index import PrefixIndex
from .policy import BlockPolicy
from .keys import BlockHash, Namespace, chain_hashes, parse_hash, root_hash
from .spec import DTYPES, KVSpec
from .store import Event, Lease, LookupResult, TierConfig, TieredStore
from .tiers.base import StorageTier, TierCapabilities, TierStats
from .tiers.disk import DiskTier
from .tiers.memory import DeviceTier, HostTier

__all__ = [
    "BlockHash",
    "BlockPolicy",
    "Codec",
    "DTYPES",
    "DeviceTier",
    "DiskTier",
    "Event",
    "Frame",
    "FrameError",
    "HostTier",
    "KVSpec",
    "Lease",
    "LookupResult",
    "Namespace",
    "PrefixIndex",
    "StorageTier",
    "TierCapabilities",
    "TierConfig",
    "TierStats",
    "TieredStore",
    "available_codecs",
    "chain_hashes",
    "decode_frame",
    "encode_frame",
    "get_codec",
    "parse_hash",
    "register_codec",
    "root_hash",
]


def __getattr__(name):  # RedisTier imports redis-py lazily
    if name == "RedisTier":
        from .tiers.redis import RedisTier

        return RedisTier
    raise AttributeError(name)
