"""API keys, tenants, and the per-tenant key space that keeps tenants apart.

Who is calling: a request carries an API key (``Authorization: Bearer <key>`` or ``X-API-Key``,
the same two as gRPC metadata ``authorization`` / ``x-api-key``). The settings map keys to
tenants; the admin key is admin of the default tenant ``""``. Keys are compared by their SHA-256
digest, so the lookup does not branch on the key's bytes. With no keys configured (open mode)
every caller is admin of the default tenant.

How tenants are kept apart — two layers:

1. Token ids. When a tenant sends token ids, the server hashes them itself under
   ``Namespace(tenant=<its tenant>, salt, extra_keys)``: the *client keys* of a tenant's chain
   are never those of another tenant's chain over the same tokens.
2. Storage keys. A client may also name blocks by raw 32-byte hashes (frames, lookups by hash,
   get, delete, pin). Whatever it sends is a *client key* ``c`` and is never used as it is: the
   store, its tiers, the disk and Redis only ever see the *storage key*::

       root_T = sha256(b"kvtier/tenant-keyspace/v1" | Namespace(tenant=T).to_bytes())
       s      = sha256(root_T | c)

   Tenant B sending A's client key gets ``sha256(root_B | c) != s``: a lookup answers a miss, a
   get answers not found, a delete or pin touches nothing. B cannot send ``s`` itself either,
   since whatever it sends is hashed again under ``root_B``. The map is one-way, so storage keys
   (admin events, Redis key names) do not reveal client keys, and it is deterministic, so every
   kvtier instance sharing a Redis derives the same storage keys. Frames leave the service with
   the client's key again (the service remembers which client key it asked for).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

from kvtier.kvstore import Namespace

from .errors import Unauthorized
from .settings import Settings

DEFAULT_TENANT = ""
_KEYSPACE_DOMAIN = b"kvtier/tenant-keyspace/v1"
_MEMO_KEYS = 1 << 14  # storage keys a KeySpace remembers (about 3 MiB at most)


@dataclass(frozen=True)
class Principal:
    tenant: str
    is_admin: bool = False


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.open = settings.open_mode
        self._by_digest: dict[bytes, Principal] = {_digest(key): Principal(tenant) for key, tenant in settings.api_keys.items()}
        if settings.admin_key is not None:
            self._by_digest[_digest(settings.admin_key.get_secret_value())] = Principal(DEFAULT_TENANT, is_admin=True)

    def authenticate(self, authorization: str | None, api_key: str | None) -> Principal:
        """The caller named by either header (Bearer token or X-API-Key); Unauthorized otherwise."""
        if self.open:
            return Principal(DEFAULT_TENANT, is_admin=True)
        key = None
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthorized("the Authorization header must be 'Bearer <api key>'", field="authorization")
            key = value.strip()
        elif api_key:
            key = api_key.strip()
        if not key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", field="authorization")
        principal = self._by_digest.get(_digest(key))
        if principal is None:
            raise Unauthorized("invalid API key", field="authorization")
        return principal


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeySpace:
    """One tenant's map from client keys to storage keys (see the module docstring)."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.root = hashlib.sha256(_KEYSPACE_DOMAIN + Namespace(tenant=tenant).to_bytes()).digest()
        # client key -> storage key for the keys seen lately: lookups ask for the same chains again and
        # again, and a dict hit costs a fraction of a SHA-256. Bounded (emptied when full); a dict's get
        # and set are atomic, so threads share it without a lock.
        self._memo: dict[bytes, bytes] = {}

    def storage_key(self, client_key: bytes) -> bytes:
        return hashlib.sha256(self.root + client_key).digest()

    def storage_keys(self, client_keys: Iterable[bytes]) -> list[bytes]:
        root, sha, memo = self.root, hashlib.sha256, self._memo
        out = []
        for c in client_keys:
            s = memo.get(c) if type(c) is bytes else None
            if s is None:
                s = sha(root + c).digest()
                if len(memo) >= _MEMO_KEYS:
                    memo.clear()
                memo[bytes(c)] = s
            out.append(s)
        return out
