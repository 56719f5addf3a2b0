from __future__ import annotations

import pytest

from kvtier.kvstore import KVSpec

from .server import ServiceProcess

ADMIN_KEY = "admin-key-0123456789"
KEYS = {"key-tenant-a-0001": "acme", "key-tenant-b-0002": "globex"}
TINY = KVSpec("tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)  # 2 KiB blocks


@pytest.fixture(scope="session")
def open_server():
    """One open-mode server (no keys) shared by the tests that only read and write their own chains."""
    s = ServiceProcess()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def keyed_server():
    """A server with two tenants, an admin key and a quota for globex."""
    import json

    s = ServiceProcess(
        {"KVTIER_API_KEYS": json.dumps(KEYS), "KVTIER_ADMIN_KEY": ADMIN_KEY, "KVTIER_QUOTAS": json.dumps({"globex": 64 << 10})}
    )
    yield s
    s.stop()
