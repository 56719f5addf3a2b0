"""The connectors' backends (service/connectors/backends.py) against a real ``kvtier serve``:
lookup by keys, lazy registration, the spec registered again after a restart, who closes the client."""

from __future__ import annotations

import pytest
import torch

from kvtier.kvstore import HostTier, KVSpec, TieredStore, chain_hashes
from kvtier.service.client import KVTierClient
from kvtier.connectors.backends import ServiceBackend, StoreBackend

SPEC = KVSpec("backends-test", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)


def blocks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SPEC.block_shape, generator=g).half()


@pytest.fixture(scope="module")
def server():
    from .server import ServiceProcess

    srv = ServiceProcess({"KVTIER_DISK_CAPACITY_BYTES": "0"})  # memory only: a restart forgets blocks and specs
    try:
        yield srv
    finally:
        srv.stop()


def test_service_backend_survives_a_restart_and_closes_only_its_own_client(server):
    tokens = list(range(100, 100 + 3 * 16 + 5))
    backend = ServiceBackend.connect(server.url, SPEC, register=False, max_blocks_per_request=2)
    assert backend._model is None  # nothing asked of the service yet
    keys = backend.keys(tokens)
    assert len(keys) == 3 and backend._model is not None
    bs = blocks(3)
    assert backend.put(keys, bs, parent=None) == [True] * 3  # two requests of at most 2 blocks
    assert backend.lookup(keys) == 3 and backend.lookup([]) == 0
    assert backend.match(tokens).num_blocks == 3
    assert all(torch.equal(g, x) for g, x in zip(backend.get(keys), bs))

    server.stop()
    server.start()  # the service forgot the spec: every call registers it again by itself
    assert backend.lookup(keys) == 0
    assert backend.put(keys, bs, parent=None) == [True] * 3
    assert backend.match(tokens).num_blocks == 3
    backend.close()
    assert backend.client._http.is_closed  # connect() opened it, close() closes it

    with KVTierClient(server.url) as client:
        shared = ServiceBackend(client, SPEC)  # registers now
        assert shared._model is not None and shared.lookup(keys) == 3
        shared.close()  # the caller's client stays open
        assert not client._http.is_closed
        assert client.lookup(shared.model, hashes=keys).num_blocks == 3


def test_store_backend_lookup_by_keys():
    store = TieredStore([HostTier(8 * SPEC.block_nbytes)])
    backend = StoreBackend(store, SPEC)
    keys = chain_hashes(SPEC, list(range(2 * 16)))
    assert backend.lookup(keys) == 0 and backend.lookup([]) == 0
    backend.put(keys, blocks(2), parent=None)
    assert backend.lookup(keys) == 2 and backend.lookup(keys[:1]) == 1
    backend.close()  # the store is the caller's: still usable
    assert store.lookup(SPEC, keys).num_blocks == 2


def test_a_local_service_is_reached_over_the_same_host_transport(tmp_path):
    """A loopback URL goes through the service's Unix socket when it exists (the connectors' default), REST otherwise."""
    from kvtier.connectors.backends import local_service_url, service_client
    from kvtier.service.local_client import LocalKVTierClient

    from .server import ServiceProcess

    sock = str(tmp_path / "kvtier.sock")
    assert local_service_url("http://127.0.0.1:1", sock) == "http://127.0.0.1:1"  # no socket there yet
    assert local_service_url("http://10.0.0.7:8080", sock) == "http://10.0.0.7:8080"
    assert local_service_url("unix:///x.sock", "") == "unix:///x.sock"
    with pytest.raises(ValueError):
        local_service_url(None, sock)  # type: ignore[arg-type]
    srv = ServiceProcess({"KVTIER_DISK_CAPACITY_BYTES": "0", "KVTIER_LOCAL_SOCKET": sock})
    try:
        assert local_service_url(srv.url, sock) == "unix://" + sock
        assert local_service_url(srv.url.replace("127.0.0.1", "localhost"), sock) == "unix://" + sock
        assert local_service_url(srv.url, "") == srv.url  # "" keeps REST
        backend = ServiceBackend.connect(srv.url, SPEC, local_socket=sock)
        assert isinstance(backend.client, LocalKVTierClient)
        keys = backend.keys(list(range(40)))
        bs = blocks(2, seed=3)
        assert backend.put(keys, bs, parent=None) == [True, True]
        with service_client(srv.url, local_socket="") as rest:  # the same blocks over REST
            assert not isinstance(rest, LocalKVTierClient)
            got = ServiceBackend(rest, SPEC).get(keys)
        assert all(torch.equal(g, b) for g, b in zip(got, bs))
        backend.close()
    finally:
        srv.stop()
