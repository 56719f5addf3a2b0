"""Chained block keys.

``BlockHash`` is a 32-byte SHA-256 digest chained over the sequence::

    h_0   = sha256(b"kvtier/v1" | spec.fingerprint | namespace)
    h_i+1 = sha256(h_i | token_ids of block i as little-endian uint32)

A block is reusable only under the same chain, so the key is itself the proof of the whole
prefix. Hashing is over block byte strings (numpy makes the token bytes), never a Python loop
over tokens, and never Python's ``hash``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import NewType, Sequence

import numpy as np

from .spec import KVSpec

BlockHash = NewType("BlockHash", bytes)
HASH_BYTES = 32
_DOMAIN = b"kvtier/v1"


@dataclass(frozen=True)
class Namespace:
    """Everything besides the tokens that decides whether KV can be reused.

    ``tenant`` isolates customers; ``salt`` is a per-request cache salt; ``extra_keys`` carries
    LoRA ids, multimodal content hashes, and anything else that changes the KV.
    """

    tenant: str = ""
    salt: str = ""
    extra_keys: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.tenant, str) or not isinstance(self.salt, str):
            raise ValueError("tenant and salt must be strings")
        if not isinstance(self.extra_keys, tuple) or not all(isinstance(k, str) for k in self.extra_keys):
            raise ValueError("extra_keys must be a tuple of strings")

    def to_bytes(self) -> bytes:
        # Length-prefixed fields: no two different namespaces encode the same bytes.
        parts = [self.tenant, self.salt, *self.extra_keys]
        out = bytearray(len(parts).to_bytes(4, "little"))
        for p in parts:
            b = p.encode()
            out += len(b).to_bytes(4, "little") + b
        return bytes(out)


def root_hash(spec: KVSpec, namespace: Namespace | None = None) -> BlockHash:
    """``h_0``: the chain's seed for a model spec and a namespace."""
    ns = (namespace or Namespace()).to_bytes()
    return BlockHash(hashlib.sha256(_DOMAIN + spec.fingerprint + ns).digest())


def _token_bytes(token_ids) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got shape {list(arr.shape)}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"token_ids must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token_ids must lie in [0, 2**32)")
    return arr.astype("<u4", copy=False)


def chain_hashes(
    spec: KVSpec,
    token_ids,
    namespace: Namespace | None = None,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Keys of every *full* block of ``token_ids`` (a trailing partial block gets no key).

    ``parent`` continues an existing chain (the key of the block before ``token_ids[0]``);
    by default the chain starts at ``root_hash(spec, namespace)``.
    """
    tokens = _token_bytes(token_ids)
    n_blocks = tokens.size // spec.block_tokens
    h: bytes = parent if parent is not None else root_hash(spec, namespace)
    if len(h) != HASH_BYTES:
        raise ValueError(f"parent must be a {HASH_BYTES}-byte hash, got {len(h)} bytes")
    buf = tokens[: n_blocks * spec.block_tokens].tobytes()
    step = spec.block_tokens * 4
    out: list[BlockHash] = []
    sha = hashlib.sha256
    for i in range(n_blocks):
        h = sha(h + buf[i * step : (i + 1) * step]).digest()
        out.append(h)  # type: ignore[arg-type]
    return out


def parse_hash(value: bytes | str) -> BlockHash:
    """A BlockHash from 32 raw bytes or 64 hex characters (ValueError otherwise)."""
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise ValueError("a block hash must be 64 hex characters") from None
    if not isinstance(value, (bytes, bytearray)) or len(value) != HASH_BYTES:
        raise ValueError(
            f"a block hash must be {HASH_BYTES} bytes, got {len(value) if hasattr(value, '__len__') else type(value).__name__}"
        )
    return BlockHash(bytes(value))


def check_keys(keys: Sequence[bytes]) -> list[BlockHash]:
    """Validate a batch of keys (ValueError on the first bad one)."""
    out = []
    for i, k in enumerate(keys):
        if type(k) is bytes and len(k) == HASH_BYTES:  # the usual case, kept short: a lookup checks every key
            out.append(BlockHash(k))  # NewType: k itself
            continue
        if not isinstance(k, (bytes, bytearray)) or len(k) != HASH_BYTES:
            raise ValueError(f"keys[{i}] must be a {HASH_BYTES}-byte BlockHash")
        out.append(BlockHash(bytes(k)))
    return out
