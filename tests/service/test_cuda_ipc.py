"""CUDA IPC handles over the local transport (``service.cuda_ipc``): device blocks cross as handles.

The transfers need a CUDA GPU and are skipped without one (this project's CI box has none). What
runs everywhere: the handle checks, and a server without CUDA refusing handles with a 400 that
changes nothing."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch

from kvtier.service import cuda_ipc
from kvtier.service.client import KVTierClient, KVTierError
from kvtier.service.errors import BadRequest
from kvtier.service.local_client import LocalKVTierClient

from .conftest import ADMIN_KEY, KEYS, TINY
from .server import ServiceProcess

KEY_A = list(KEYS)[0]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def server():
    d = tempfile.mkdtemp(prefix="kvtier-ipc-")
    s = ServiceProcess(
        {"KVTIER_API_KEYS": json.dumps(KEYS), "KVTIER_ADMIN_KEY": ADMIN_KEY, "KVTIER_LOCAL_SOCKET": f"{d}/kv.sock"},
        data_dir=d,
    )
    s.socket = f"unix://{d}/kv.sock"
    yield s
    s.stop()


def a_handle(**change):
    """A well-formed handle to one TINY block (the shape of ``export``'s answer; its bytes name nothing)."""
    n = 1
    for x in TINY.block_shape:
        n *= x
    stride, acc = [], 1
    for x in reversed(TINY.block_shape):
        stride.insert(0, acc)
        acc *= x
    h = {
        "uuid": "GPU-00000000-0000-0000-0000-000000000000",
        "handle": bytes(64),
        "storage_bytes": n * TINY.torch_dtype.itemsize,
        "storage_offset_bytes": 0,
        "ref_handle": bytes(16),
        "ref_offset": 0,
        "event_handle": None,
        "event_sync": False,
        "offset": 0,
        "shape": list(TINY.block_shape),
        "stride": stride,
        "dtype": str(TINY.torch_dtype).removeprefix("torch."),
    }
    h.update(change)
    return h


def test_a_well_formed_handle_passes_the_checks():
    assert cuda_ipc.check_handle(a_handle(), TINY.block_shape, TINY.torch_dtype, "h")["offset"] == 0


@pytest.mark.parametrize(
    "bad, words",
    [
        ("not a map", "must be a map"),
        (a_handle(handle="str"), "'handle'"),
        ({k: v for k, v in a_handle().items() if k != "uuid"}, "'uuid'"),
        (a_handle(offset=True), "'offset'"),
        (a_handle(extra=1), "unknown field"),
        (a_handle(dtype="int8"), "shape"),
        (a_handle(shape=[1, 2, 3]), "shape"),
        (a_handle(stride=[1] * len(TINY.block_shape)), "contiguous"),
        (a_handle(offset=1), "outside its storage"),
        (a_handle(storage_bytes=8), "outside its storage"),
    ],
)
def test_malformed_handles_are_a_bad_request(bad, words):
    with pytest.raises(BadRequest, match=words):
        cuda_ipc.check_handle(bad, TINY.block_shape, TINY.torch_dtype, "h")


def test_export_needs_a_cuda_tensor():
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_ipc.export(torch.zeros(4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a server without CUDA")
def test_a_server_without_cuda_refuses_handles_and_changes_nothing(server):
    c = LocalKVTierClient(server.socket, api_key=KEY_A)
    model = c.register_spec(TINY)
    assert c._use_cuda_ipc([torch.zeros(1)]) is False  # CPU tensors: the segment
    c.stats()
    assert c._server_cuda_ipc is False  # the hello answer says the server maps no handles
    key = bytes([7]) * 32
    for args, field in (
        ({"model": model, "keys": [key], "handles": [a_handle()]}, "op"),
        ({"model": model, "keys": [key], "handles": [a_handle(shape=[1])]}, "handles[0]"),
        ({"model": model, "keys": [key], "handles": []}, "handles"),
    ):
        for op in ("put_cuda", "get_cuda"):
            with pytest.raises(KVTierError) as e:
                c._call(op, dict(args))
            assert e.value.status == 400 and e.value.field == field, (op, e.value)
    assert c.get(model, [key]) == [None]  # nothing stored
    c.close()


@cuda
def test_cuda_blocks_put_and_get_through_handles_equal_the_segment_path(server):
    ipc = KVTierClient(server.socket, api_key=KEY_A)
    seg = LocalKVTierClient(server.socket, api_key=KEY_A, cuda_ipc=False)
    model = ipc.register_spec(TINY)
    g = torch.Generator().manual_seed(3)
    host = [torch.randn(TINY.block_shape, generator=g).to(TINY.torch_dtype) for _ in range(40)]  # 2 requests of 32 + 8
    keys = ipc.hashes(model, [i % 30000 for i in range(40 * TINY.block_tokens)])
    assert ipc.put(model, keys, [b.cuda() for b in host]) == [True] * 40
    assert ipc._server_cuda_ipc is True
    for got, want in zip(seg.get(model, keys), host):  # stored, checksummed frames: read back through the segment
        assert torch.equal(got, want)
    out = [torch.empty(TINY.block_shape, dtype=TINY.torch_dtype, device="cuda") for _ in range(41)]
    got = ipc.get(model, keys + [bytes([5]) * 32], out=out)
    assert got[-1] is None and all(g is o for g, o in zip(got[:-1], out[:-1]))
    for o, want in zip(out, host):
        assert torch.equal(o.cpu(), want)
    assert ipc.lookup(model, hashes=keys).num_blocks == 40
    with pytest.raises(ValueError, match="shape"):
        ipc.put(model, keys[:1], [torch.zeros(3, device="cuda")])
    ipc.close()
    seg.close()
