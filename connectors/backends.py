"""Where a ``KVTierCache`` keeps its blocks: the in-process store or the service, behind one protocol.

A backend is bound to one ``KVSpec`` and one namespace (tenant, cache salt, extra keys), so that
the cache above it deals in token ids, block keys and blocks ``[L, 2, H_kv, block_tokens, D]`` in
the spec's dtype, and nothing else:

- ``match(token_ids)``: the keys of every full block of ``token_ids`` and how many of them, from
  the start, are cached (the longest cached prefix), with the tier that would serve each;
- ``keys(token_ids)``: the keys of the full blocks, from the chain's start (a chain is continued
  from a known key without asking: ``kvstore.chain_hashes(spec, tokens, parent=key)``);
- ``get(keys)`` / ``put(keys, blocks, parent=...)``: blocks in and out;
- ``lookup(keys)``: the longest cached prefix of a chain given by its keys (the vLLM connector
  hashes the chain itself); ``close()``: release what the backend opened.

``StoreBackend`` runs over a ``kvstore.TieredStore`` in this process; ``ServiceBackend`` over a
``service.client.KVTierClient`` (the REST SDK): there the tenant comes from the API key, and the
service hashes the chain under it. The transformers cache (``hf_cache``) and the vLLM connector
(``vllm``) both use these two classes.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable
from urllib.parse import urlsplit

import torch

from kvtier.kvstore import KVSpec, LookupResult, Namespace, TieredStore, chain_hashes


@dataclass(frozen=True)
class PrefixMatch:
    keys: list[bytes]  # one per full block of the tokens asked, in chain order
    num_blocks: int  # the longest cached prefix of that chain, in blocks
    tier_hits: dict[str, int]  # of those blocks, how many each tier would serve (the fastest holder), fastest tier first


@runtime_checkable
class KVBackend(Protocol):
    spec: KVSpec

    """Where a connector's blocks live: a store of this process or a kvtier service. The one protocol of
    both connectors (the transformers cache uses ``match``/``keys``, vLLM's ``lookup``; both ``get``/``put``)."""

    def match(self, token_ids: Sequence[int]) -> PrefixMatch: ...

    def keys(self, token_ids: Sequence[int]) -> list[bytes]: ...

    def lookup(self, keys: Sequence[bytes]) -> int: ...  # longest cached prefix of the chain, in blocks

    def get(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]: ...  # [L, 2, H_kv, T, D] each, None: a miss

    def put(self, keys: Sequence[bytes], blocks: torch.Tensor, *, parent: bytes | None) -> list[bool]: ...

    def close(self) -> None: ...


def _check_spec(spec) -> KVSpec:
    if not isinstance(spec, KVSpec):
        raise ValueError(f"spec must be a kvstore.KVSpec, got {type(spec).__name__}")
    return spec


class StoreBackend:
    """Blocks in a ``TieredStore`` of this process; keys hashed here under ``Namespace(tenant, salt, extra_keys)``."""

    def __init__(self, store: TieredStore, spec: KVSpec, *, tenant: str = "", salt: str = "", extra_keys: Sequence[str] = ()) -> None:
        if not isinstance(store, TieredStore):
            raise ValueError(f"store must be a kvstore.TieredStore, got {type(store).__name__}")
        self.store = store
        self.spec = _check_spec(spec)
        self.tenant = tenant
        self.namespace = Namespace(tenant=tenant, salt=salt, extra_keys=tuple(extra_keys))
        store.register_spec(spec)  # adopts blocks a persistent tier (disk) kept from an earlier run

    def keys(self, token_ids: Sequence[int]) -> list[bytes]:
        return list(chain_hashes(self.spec, token_ids, self.namespace))

    def match(self, token_ids: Sequence[int]) -> PrefixMatch:
        keys = self.keys(token_ids)
        found = self._lookup(keys)
        return PrefixMatch(keys, found.num_blocks, dict(found.tier_hits))

    def lookup(self, keys: Sequence[bytes]) -> int:
        return self._lookup(keys).num_blocks if keys else 0

    def lookup_tiers(self, keys: Sequence[bytes]) -> tuple[int, dict[str, int]]:
        """``lookup`` and, of the blocks found, how many each tier would serve (fastest first)."""
        if not keys:
            return 0, {}
        found = self._lookup(keys)
        return found.num_blocks, dict(found.tier_hits)

    def _lookup(self, keys: Sequence[bytes]) -> LookupResult:
        found = self.store.lookup(self.spec, keys)
        assert found is not None  # lookup waits for the lock unless told not to
        return found

    def get(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        return self.store.get(self.spec, keys)

    def put(self, keys: Sequence[bytes], blocks: torch.Tensor, *, parent: bytes | None) -> list[bool]:
        return self.store.put(self.spec, keys, blocks, tenant=self.tenant, parent=parent)

    def close(self) -> None:
        return  # the store belongs to whoever made it


class ServiceBackend:
    """Blocks in a kvtier service through the REST SDK.

    Gets and puts are split into requests of at most ``max_blocks_per_request`` blocks and
    ``max_request_bytes`` (at least one block each). The spec is registered at construction
    (``register=True``: a wrong URL or key fails there) or at first use (``register=False``:
    nothing is asked of the service until then); a service that answers that it does not know the
    model (it restarted without its spec registry) gets the spec again, once per call.
    ``ServiceBackend.connect(url, spec, ...)`` opens its own client, which ``close()`` closes; a
    client passed in is the caller's.
    """

    def __init__(
        self,
        client,
        spec: KVSpec,
        *,
        salt: str = "",
        extra_keys: Sequence[str] = (),
        max_blocks_per_request: int = 32,
        max_request_bytes: int = 32 << 20,
        register: bool = True,
        owns_client: bool = False,
    ) -> None:
        from kvtier.service.client import KVTierClient

        if not isinstance(client, KVTierClient):
            raise ValueError(f"client must be a service.client.KVTierClient, got {type(client).__name__}")
        for name, v in (("max_blocks_per_request", max_blocks_per_request), ("max_request_bytes", max_request_bytes)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.client = client
        self.spec = _check_spec(spec)
        self.salt = salt
        self.extra_keys = tuple(extra_keys)
        self.owns_client = owns_client
        Namespace(salt=salt, extra_keys=self.extra_keys)  # the same checks as in process
        # the service bounds blocks and bytes per request (max_blocks_per_request, max_request_bytes: 64, 128 MiB by default)
        self.max_blocks = max(1, min(max_blocks_per_request, max_request_bytes // spec.block_nbytes))
        self._model: str | None = None
        if register:
            self._model = client.register_spec(spec)

    @classmethod
    def connect(
        cls,
        url: str,
        spec: KVSpec,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 2,
        local_socket: str | None = None,
        **options,
    ) -> "ServiceBackend":
        """A backend with its own ``KVTierClient`` to ``url`` (closed by ``close()``): over the same-host
        transport when the service is local (``local_service_url(url, local_socket)``), REST otherwise."""
        from kvtier.service.client import KVTierClient

        client = KVTierClient(local_service_url(url, local_socket), api_key, timeout=timeout_s, retries=retries)
        return cls(client, spec, owns_client=True, **options)

    @property
    def model(self) -> str:
        """The service's id of the spec (registering it on first use)."""
        if self._model is None:
            self._model = self.client.register_spec(self.spec)
        return self._model

    def _with_model(self, call: Callable[[str], Any]) -> Any:
        """``call(model)``; a service that forgot the spec gets it again, once."""
        from kvtier.service.client import KVTierError

        try:
            return call(self.model)
        except KVTierError as e:
            if e.status != 404 or e.field != "model":
                raise
            self._model = None
            return call(self.model)

    def keys(self, token_ids: Sequence[int]) -> list[bytes]:
        return self.match(token_ids).keys

    def match(self, token_ids: Sequence[int]) -> PrefixMatch:
        if len(token_ids) < self.spec.block_tokens:
            return PrefixMatch([], 0, {})
        found = self._with_model(
            lambda m: self.client.lookup(m, token_ids=list(token_ids), salt=self.salt, extra_keys=self.extra_keys, return_keys=True)
        )
        return PrefixMatch(list(found.keys), found.num_blocks, dict(found.tier_hits))

    def lookup(self, keys: Sequence[bytes]) -> int:
        return self._with_model(lambda m: self.client.lookup(m, hashes=list(keys)).num_blocks) if keys else 0

    def lookup_tiers(self, keys: Sequence[bytes]) -> tuple[int, dict[str, int]]:
        """``lookup`` and, of the blocks found, how many each tier would serve (fastest first)."""
        if not keys:
            return 0, {}
        found = self._with_model(lambda m: self.client.lookup(m, hashes=list(keys)))
        return found.num_blocks, dict(getattr(found, "tier_hits", None) or {})

    def get(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for i in range(0, len(keys), self.max_blocks):
            out += self._with_model(lambda m: self.client.get(m, keys[i : i + self.max_blocks]))
        return out

    def put(self, keys: Sequence[bytes], blocks: torch.Tensor, *, parent: bytes | None) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(keys), self.max_blocks):
            chunk_parent = keys[i - 1] if i else parent
            out += self._with_model(
                lambda m: self.client.put(m, keys[i : i + self.max_blocks], blocks[i : i + self.max_blocks], parent=chunk_parent)
            )
        return out

    def close(self) -> None:
        if self.owns_client:
            self.client.close()


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def local_service_url(url: str, local_socket: str | None = None) -> str:
    """The URL a connector uses for the kvtier service at ``url``: the same-host transport when the service is local.

    ``unix://PATH`` stays as it is. An ``http(s)://`` URL whose host is a loopback address
    (``127.0.0.1``, ``localhost``, ``::1``) becomes ``unix://`` + ``local_socket`` when that socket
    exists (the service runs with ``kvtier serve --local-socket PATH``); ``local_socket`` None reads
    ``$KVTIER_LOCAL_SOCKET`` (the service's own setting), ``""`` keeps HTTP. Any other URL is kept.
    """
    if not isinstance(url, str):
        raise ValueError(f"url must be a string, got {type(url).__name__}")
    if url.startswith("unix://") or not url.startswith(("http://", "https://")):
        return url
    if local_socket is None:
        local_socket = os.environ.get("KVTIER_LOCAL_SOCKET", "")
    if not local_socket:
        return url
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK_HOSTS:
        return url
    try:
        if not stat.S_ISSOCK(os.stat(local_socket).st_mode):
            return url
    except OSError:  # not there (yet): HTTP, which says clearly when the service is down
        return url
    return "unix://" + local_socket


def service_client(url: str, api_key: str | None = None, *, local_socket: str | None = None, **options):
    """A ``KVTierClient`` of the service at ``url``, over the same-host shared-memory transport when the
    service is local (``local_service_url``), REST otherwise; ``options`` go to the client (``timeout``,
    ``retries``, ...). Make one per process and pass it as ``kv=`` to ``KVTierCache`` and ``generate``."""
    from kvtier.service.client import KVTierClient

    return KVTierClient(local_service_url(url, local_socket), api_key, **options)


def make_backend(
    spec: KVSpec,
    *,
    kv=None,
    store=None,
    client=None,
    backend=None,
    tenant: str = "",
    salt: str = "",
    extra_keys: Sequence[str] = (),
) -> KVBackend:
    """The backend for ``kv``: a ``kvstore.TieredStore`` of this process, a ``KVTierClient`` of a running
    service (REST or the same-host transport), or any ``KVBackend`` (returned as is).

    ``store=``, ``client=`` and ``backend=`` are the older spellings of ``kv=`` (one each kind); they still
    work, with a ``DeprecationWarning``, and at most one of the four may be given."""
    given = [name for name, v in (("kv", kv), ("store", store), ("client", client), ("backend", backend)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give kv= (a TieredStore, a KVTierClient or a KVBackend) once, got {given or 'none'}")
    if kv is None:
        warnings.warn(f"{given[0]}= is deprecated: pass kv= (it takes a store, a client or a backend)", DeprecationWarning, stacklevel=3)
        if backend is not None and not isinstance(backend, KVBackend):
            raise ValueError(f"backend must have spec, match, keys, lookup, get, put and close (KVBackend), got {type(backend).__name__}")
        kv = store if store is not None else client if client is not None else backend
    if isinstance(kv, TieredStore):
        return StoreBackend(kv, spec, tenant=tenant, salt=salt, extra_keys=extra_keys)
    if isinstance(kv, KVBackend):
        return kv
    from kvtier.service.client import KVTierClient

    if not isinstance(kv, KVTierClient):
        raise ValueError(
            "kv must be a kvstore.TieredStore, a service.client.KVTierClient or a KVBackend "
            f"(spec, match, keys, lookup, get, put, close), got {type(kv).__name__}"
        )
    if tenant:
        raise ValueError("tenant= is for an in-process store; the service takes the tenant from the client's API key")
    return ServiceBackend(kv, spec, salt=salt, extra_keys=extra_keys)
