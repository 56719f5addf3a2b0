from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Spec(_message.Message):
    __slots__ = ("model_id", "num_layers", "num_kv_heads", "head_dim", "dtype", "block_tokens")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_tokens: int
    def __init__(self, model_id: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., block_tokens: _Optional[int] = ...) -> None: ...

class SpecReply(_message.Message):
    __slots__ = ("model", "block_nbytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NBYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    block_nbytes: int
    def __init__(self, model: _Optional[str] = ..., block_nbytes: _Optional[int] = ...) -> None: ...

class UnregisterRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnregisterReply(_message.Message):
    __slots__ = ("unregistered",)
    UNREGISTERED_FIELD_NUMBER: _ClassVar[int]
    unregistered: bool
    def __init__(self, unregistered: _Optional[bool] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("model", "token_ids", "hashes", "salt", "extra_keys", "return_keys")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEYS_FIELD_NUMBER: _ClassVar[int]
    RETURN_KEYS_FIELD_NUMBER: _ClassVar[int]
    model: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    salt: str
    extra_keys: _containers.RepeatedScalarFieldContainer[str]
    return_keys: bool
    def __init__(self, model: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., hashes: _Optional[_Iterable[bytes]] = ..., salt: _Optional[str] = ..., extra_keys: _Optional[_Iterable[str]] = ..., return_keys: _Optional[bool] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("model", "num_blocks", "num_tokens", "num_requested_blocks", "tier_hits", "tier_prefix", "keys")
    class TierHitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class TierPrefixEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TIER_HITS_FIELD_NUMBER: _ClassVar[int]
    TIER_PREFIX_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_blocks: int
    num_tokens: int
    num_requested_blocks: int
    tier_hits: _containers.ScalarMap[str, int]
    tier_prefix: _containers.ScalarMap[str, int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, model: _Optional[str] = ..., num_blocks: _Optional[int] = ..., num_tokens: _Optional[int] = ..., num_requested_blocks: _Optional[int] = ..., tier_hits: _Optional[_Mapping[str, int]] = ..., tier_prefix: _Optional[_Mapping[str, int]] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("model", "parent", "frame")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    model: str
    parent: bytes
    frame: bytes
    def __init__(self, model: _Optional[str] = ..., parent: _Optional[bytes] = ..., frame: _Optional[bytes] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("stored", "num_stored")
    STORED_FIELD_NUMBER: _ClassVar[int]
    NUM_STORED_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bool]
    num_stored: int
    def __init__(self, stored: _Optional[_Iterable[bool]] = ..., num_stored: _Optional[int] = ...) -> None: ...

class KeysRequest(_message.Message):
    __slots__ = ("model", "keys")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    model: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, model: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class BlockReply(_message.Message):
    __slots__ = ("key", "found", "frame")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    found: bool
    frame: bytes
    def __init__(self, key: _Optional[bytes] = ..., found: _Optional[bool] = ..., frame: _Optional[bytes] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("model", "keys", "ttl_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_s: float
    def __init__(self, model: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class PinReply(_message.Message):
    __slots__ = ("lease_id", "ttl_s", "num_pinned")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    NUM_PINNED_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    ttl_s: float
    num_pinned: int
    def __init__(self, lease_id: _Optional[int] = ..., ttl_s: _Optional[float] = ..., num_pinned: _Optional[int] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    def __init__(self, lease_id: _Optional[int] = ...) -> None: ...

class UnpinReply(_message.Message):
    __slots__ = ("unpinned",)
    UNPINNED_FIELD_NUMBER: _ClassVar[int]
    unpinned: bool
    def __init__(self, unpinned: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("after", "limit")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after: int
    limit: int
    def __init__(self, after: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class JsonReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("ready", "tiers")
    class TiersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    READY_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    tiers: _containers.ScalarMap[str, str]
    def __init__(self, ready: _Optional[bool] = ..., tiers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("model", "token_ids", "hashes", "salt", "extra_keys", "q", "budget", "layers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEYS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    salt: str
    extra_keys: _containers.RepeatedScalarFieldContainer[str]
    q: Tensor
    budget: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., hashes: _Optional[_Iterable[bytes]] = ..., salt: _Optional[str] = ..., extra_keys: _Optional[_Iterable[str]] = ..., q: _Optional[_Union[Tensor, _Mapping]] = ..., budget: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ...) -> None: ...

class RetrieveReply(_message.Message):
    __slots__ = ("model", "layers", "budget", "num_tokens", "num_blocks", "num_requested_blocks", "token_ids", "fetched", "summarized")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FETCHED_FIELD_NUMBER: _ClassVar[int]
    SUMMARIZED_FIELD_NUMBER: _ClassVar[int]
    model: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    budget: int
    num_tokens: int
    num_blocks: int
    num_requested_blocks: int
    token_ids: Tensor
    fetched: _containers.RepeatedScalarFieldContainer[int]
    summarized: int
    def __init__(self, model: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., budget: _Optional[int] = ..., num_tokens: _Optional[int] = ..., num_blocks: _Optional[int] = ..., num_requested_blocks: _Optional[int] = ..., token_ids: _Optional[_Union[Tensor, _Mapping]] = ..., fetched: _Optional[_Iterable[int]] = ..., summarized: _Optional[int] = ...) -> None: ...

class AttentionReply(_message.Message):
    __slots__ = ("model", "layers", "budget", "num_tokens", "num_blocks", "num_requested_blocks", "attended", "fetched", "o", "lse")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ATTENDED_FIELD_NUMBER: _ClassVar[int]
    FETCHED_FIELD_NUMBER: _ClassVar[int]
    O_FIELD_NUMBER: _ClassVar[int]
    LSE_FIELD_NUMBER: _ClassVar[int]
    model: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    budget: int
    num_tokens: int
    num_blocks: int
    num_requested_blocks: int
    attended: int
    fetched: _containers.RepeatedScalarFieldContainer[int]
    o: Tensor
    lse: Tensor
    def __init__(self, model: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., budget: _Optional[int] = ..., num_tokens: _Optional[int] = ..., num_blocks: _Optional[int] = ..., num_requested_blocks: _Optional[int] = ..., attended: _Optional[int] = ..., fetched: _Optional[_Iterable[int]] = ..., o: _Optional[_Union[Tensor, _Mapping]] = ..., lse: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
