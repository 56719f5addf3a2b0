"""The REST API's request and response models (pydantic), with the limits of service/limits.py."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from .limits import MAX_DTYPE_CHARS, MAX_EXTRA_KEYS, MAX_MODEL_CHARS, MAX_MODEL_ID_CHARS, MAX_NAMESPACE_CHARS, MAX_TOKEN_ID

HEX64 = r"^[0-9a-fA-F]{64}$"
Hash = Annotated[str, Field(pattern=HEX64, description="a block hash: 64 hex characters (32 bytes)")]


# -- request and response models -----------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpecIn(_Strict):
    model_id: str = Field(min_length=1, max_length=MAX_MODEL_ID_CHARS)
    num_layers: int = Field(ge=1, le=4096)
    num_kv_heads: int = Field(ge=1, le=4096)
    head_dim: int = Field(ge=1, le=4096)
    dtype: str = Field("float16", max_length=32, description="float16, bfloat16, float32 or float8_e4m3fn")
    block_tokens: int = Field(256, ge=16, le=1 << 20, description="a multiple of 16")


class SpecOut(BaseModel):
    model: str = Field(description="the model id to use in every other call (hex of the spec's fingerprint)")
    spec: dict
    block_nbytes: int
    block_shape: list[int]


class LookupIn(_Strict):
    model: str = Field(max_length=MAX_MODEL_CHARS)
    token_ids: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | None = Field(
        None, description="the sequence's token ids; the server hashes its full blocks under the caller's tenant"
    )
    hashes: list[Hash] | None = Field(None, description="the chain's block hashes (instead of token_ids)")
    salt: str = Field("", max_length=MAX_NAMESPACE_CHARS, description="cache salt (part of the namespace; with token_ids)")
    extra_keys: list[Annotated[str, Field(max_length=MAX_NAMESPACE_CHARS)]] = Field(
        default_factory=list, max_length=MAX_EXTRA_KEYS, description="LoRA ids, multimodal hashes, ... (with token_ids)"
    )
    return_keys: bool = Field(False, description="also return the chain's block hashes (to put blocks under)")


class LookupOut(BaseModel):
    model: str
    num_blocks: int = Field(description="longest cached prefix, in blocks")
    num_tokens: int
    num_requested_blocks: int
    tier_hits: dict[str, int] = Field(description="of the cached prefix, how many blocks each tier would serve")
    tier_prefix: dict[str, int] = Field(description="longest prefix each tier holds on its own")
    keys: list[str] | None = None


class KeysIn(_Strict):
    model: str = Field(max_length=MAX_MODEL_CHARS)
    keys: list[Hash] = Field(min_length=1)


class PutOut(BaseModel):
    stored: list[bool]
    num_stored: int


class DeleteOut(BaseModel):
    removed: int


class PinIn(KeysIn):
    ttl_s: float = Field(gt=0, description="lease length in seconds (at most max_pin_ttl_s)")


class PinOut(BaseModel):
    lease_id: int = Field(description="0 when nothing was pinned (none of the keys is cached): no lease is held, nothing to unpin")
    ttl_s: float
    num_pinned: int


TensorData = Annotated[
    bytes | str,
    WithJsonSchema(
        {
            "type": "string",
            "contentEncoding": "base64",
            "description": "the raw little-endian elements in C order: base64 text in JSON, bytes (bin) in msgpack",
        }
    ),
]


class TensorIn(_Strict):
    dtype: str = Field(max_length=MAX_DTYPE_CHARS, description="float16, bfloat16 or float32")
    shape: list[Annotated[int, Field(ge=0, le=1 << 20)]] = Field(max_length=8)
    data: TensorData


class TensorOut(BaseModel):
    dtype: str = Field(description="float32 (o, lse) or int64 (token_ids)")
    shape: list[int]
    data: str = Field(description="the raw little-endian elements in C order (base64 in JSON, bin in msgpack)")


class _QueryIn(_Strict):
    model: str = Field(max_length=MAX_MODEL_CHARS)
    token_ids: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | None = Field(
        None, description="the sequence's token ids; the server hashes its full blocks under the caller's tenant"
    )
    hashes: list[Hash] | None = Field(None, description="the chain's block hashes (instead of token_ids)")
    salt: str = Field("", max_length=MAX_NAMESPACE_CHARS, description="cache salt (with token_ids)")
    extra_keys: list[Annotated[str, Field(max_length=MAX_NAMESPACE_CHARS)]] = Field(
        default_factory=list, max_length=MAX_EXTRA_KEYS, description="LoRA ids, multimodal hashes, ... (with token_ids)"
    )
    q: TensorIn = Field(
        description="one decode query per layer asked: [L_q, H_q, head_dim], float16/bfloat16/float32, H_q a multiple of num_kv_heads (GQA)"
    )
    layers: list[Annotated[int, Field(ge=0, le=1 << 16)]] | None = Field(
        None, max_length=1 << 16, description="the layers of q's rows, distinct (default: every layer, in order)"
    )


class RetrieveIn(_QueryIn):
    budget: int = Field(ge=1, le=1 << 31, description="tokens per (layer, KV head), sinks and recent window included")


class AttentionIn(_QueryIn):
    budget: int | None = Field(
        None,
        ge=1,
        le=1 << 31,
        description="sparse: the tokens StoreRetriever selects per (layer, KV head); absent: every cached token of the chain",
    )


class RetrieveOut(BaseModel):
    model: str
    layers: list[int]
    budget: int
    num_tokens: int = Field(description="tokens of the cached prefix searched (0: nothing cached for this tenant)")
    num_blocks: int
    num_requested_blocks: int
    token_ids: TensorOut = Field(description="int64 [L_q, num_kv_heads, budget]: positions in the sequence, ascending, -1 padding")
    fetched: list[int] = Field(description="chain positions of the blocks read to gather the selection")
    summarized: int = Field(description="blocks read only to compute a summary no longer in memory")


class AttentionOut(BaseModel):
    model: str
    layers: list[int]
    budget: int | None
    num_tokens: int = Field(description="tokens of the cached prefix (0: nothing cached: o = 0, lse = -inf)")
    num_blocks: int
    num_requested_blocks: int
    attended: int = Field(description="most tokens one (layer, KV head) attended")
    fetched: list[int] = Field(description="chain positions of the blocks read")
    o: TensorOut = Field(description="float32 [L_q, H_q, head_dim]")
    lse: TensorOut = Field(description="float32 [L_q, H_q], natural log; -inf where nothing was attended")


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


ERRORS = {s: {"model": ErrorOut} for s in (400, 401, 403, 404, 413, 415, 422, 429)}
