"""CUDA IPC handles for the same-host transport: device blocks that never leave the GPU to cross it.

A client of the local transport (``service.local``) whose blocks are CUDA tensors need not copy
them to host memory and through the shared segment: it sends, per block, a **handle** to the
tensor's GPU memory (``export``), and the server maps that memory (``open_block``) and copies from
it (a put) or into it (a get). The bytes then cross only the GPU's own memory, once.

A handle is a msgpack map of plain values (never a pickle: a client must not be able to run code
in the server), made from ``UntypedStorage._share_cuda_()`` as ``torch.multiprocessing`` makes its
own: the allocation's IPC handle, the storage's size and offset in it, the producer's reference
counter (the client's memory stays allocated while the server holds a mapping) and its event
(the server's stream waits for the client's last write), plus the tensor's offset, shape, stride
and dtype, and the device's UUID (the two processes may number their GPUs differently:
``CUDA_VISIBLE_DEVICES``). The server checks each handle against the model's spec (shape, dtype,
contiguous, within its storage) before mapping it; anything else is a 400.

The server advertises ``cuda_ipc: true`` in its hello answer when it has CUDA (``available``):
``LocalKVTierClient`` then uses the ``put_cuda``/``get_cuda`` operations for CUDA tensors and the
segment otherwise. The same authentication, tenancy, quotas, request limits and rates apply.
Checksums: a frame's checksum guards bytes that travel through memory or a socket a client
writes; a handle's bytes are read from the client's own GPU allocation by the driver, so there is
no frame to verify. The server computes the stored frame's checksum from the bytes it copied, as
for any put, and every later read is verified against it.

**Status:** written against torch's CUDA IPC API, with tests that need a CUDA GPU
(``tests/service/test_cuda_ipc.py``); this project's machines have none, so those tests have not
run yet. The argument checks run everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import BadRequest

# the fields of a handle, their types (bytes-like values arrive from msgpack as bytes)
_FIELDS: dict[str, tuple] = {
    "uuid": (str,),
    "handle": (bytes,),
    "storage_bytes": (int,),
    "storage_offset_bytes": (int,),
    "ref_handle": (bytes,),
    "ref_offset": (int,),
    "event_handle": (bytes, type(None)),
    "event_sync": (bool,),
    "offset": (int,),
    "shape": (list,),
    "stride": (list,),
    "dtype": (str,),
}


def available() -> bool:
    """True when this process can map other processes' CUDA memory (it has a CUDA device)."""
    return torch.cuda.is_available()


def _uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _index_of(uuid: str) -> int | None:
    for i in range(torch.cuda.device_count()):
        if _uuid(i) == uuid:
            return i
    return None


def export(t: torch.Tensor) -> dict:
    """A handle to CUDA tensor ``t``'s memory (the client's side). ValueError unless ``t`` is a
    contiguous CUDA tensor. The client must keep ``t`` alive, and not write it, until the request
    that carries the handle is answered."""
    if not isinstance(t, torch.Tensor) or not t.is_cuda:
        raise ValueError("a CUDA IPC handle is made of a CUDA tensor")
    if not t.is_contiguous():
        raise ValueError("a CUDA IPC handle is made of a contiguous tensor")
    st = t.untyped_storage()
    dev, handle, size, off, ref_h, ref_off, ev, ev_sync = st._share_cuda_()
    return {
        "uuid": _uuid(int(dev)),
        "handle": bytes(handle),
        "storage_bytes": int(size),
        "storage_offset_bytes": int(off),
        "ref_handle": bytes(ref_h),
        "ref_offset": int(ref_off),
        "event_handle": None if ev is None else bytes(ev),
        "event_sync": bool(ev_sync),
        "offset": int(t.storage_offset()),
        "shape": list(t.shape),
        "stride": list(t.stride()),
        "dtype": str(t.dtype).removeprefix("torch."),
    }


def check_handle(h: Any, shape: tuple, dtype: torch.dtype, field: str) -> dict:
    """``h`` as a handle to one block of ``shape`` and ``dtype`` (BadRequest otherwise): every field
    present with its type, the tensor contiguous and within its storage. Runs without CUDA."""
    if not isinstance(h, dict):
        raise BadRequest("a CUDA IPC handle must be a map", field=field)
    for name, types in _FIELDS.items():
        v = h.get(name)
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            raise BadRequest(f"a CUDA IPC handle needs {name!r} ({'/'.join(t.__name__ for t in types)})", field=field)
    extra = set(h) - set(_FIELDS)
    if extra:
        raise BadRequest(f"unknown field {sorted(extra)[0][:64]!r} in a CUDA IPC handle", field=field)
    want = str(dtype).removeprefix("torch.")
    if h["dtype"] != want or [int(x) for x in h["shape"]] != list(shape):
        raise BadRequest(
            f"a CUDA IPC handle must name a {want} tensor of shape {list(shape)}, got {h['dtype']} {h['shape']}"[:300], field=field
        )
    like = torch.empty(tuple(shape), dtype=dtype, device="meta")  # the contiguous block: its strides and size, no memory
    if [int(x) for x in h["stride"]] != list(like.stride()):
        raise BadRequest("a CUDA IPC handle must name a contiguous tensor", field=field)
    if h["offset"] < 0 or h["storage_offset_bytes"] < 0 or (h["offset"] + like.numel()) * like.element_size() > h["storage_bytes"]:
        raise BadRequest("a CUDA IPC handle's tensor lies outside its storage", field=field)
    return h


def open_block(h: dict, shape: tuple, dtype: torch.dtype, field: str = "handles") -> torch.Tensor:
    """The client's tensor ``h`` names, mapped into this process (the server's side): a view of
    the client's GPU memory. BadRequest if the handle is malformed, names another shape or dtype,
    or a GPU this process does not see, or cannot be opened."""
    h = check_handle(h, shape, dtype, field)
    if not available():
        raise BadRequest("this server has no CUDA device: send the blocks through the segment", field=field)
    index = _index_of(h["uuid"])
    if index is None:
        raise BadRequest(f"the GPU {h['uuid'][:64]!r} of a CUDA IPC handle is not visible to the server", field=field)
    try:
        torch.cuda._lazy_init()
        storage = torch.UntypedStorage._new_shared_cuda(
            index,
            h["handle"],
            h["storage_bytes"],
            h["storage_offset_bytes"],
            h["ref_handle"],
            h["ref_offset"],
            h["event_handle"],
            h["event_sync"],
        )
    except (RuntimeError, TypeError) as e:
        raise BadRequest(f"a CUDA IPC handle could not be opened: {str(e)[:200]}", field=field) from None
    t = torch.empty(0, dtype=dtype, device=torch.device("cuda", index))
    t.set_(storage, h["offset"], tuple(shape), tuple(int(x) for x in h["stride"]))
    return t
