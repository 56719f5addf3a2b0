"""The msgpack wire format of block transfers.

A body that carries blocks (``PUT /v1/blocks``, the answer of ``POST /v1/blocks/get``) is a
msgpack *stream*: one item after another, each item either a ``bin`` holding one frame
(``kvstore.frames``: ``{v, key, spec, codec, codec_meta, shape, dtype, checksum_alg, checksum,
data}``) or ``nil`` (a block that was asked for and is not cached). Any msgpack decoder reads it
(``msgpack.Unpacker`` yields ``bytes``/``None``); this module splits it without copying the frames.
Writers use bin32 headers so a frame's header is written without knowing msgpack's size classes.
"""

from __future__ import annotations

import struct
from typing import Iterable, Iterator

from .errors import BadRequest

FRAMES_MEDIA_TYPE = "application/x-kvtier-frames"  # a msgpack stream of bin (frame) / nil items
FRAME_MEDIA_TYPE = "application/x-kvtier-frame"  # exactly one frame, no item header
NIL = b"\xc0"
_BIN_SIZES = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # bin8, bin16, bin32: bytes of the length that follows


def item_header(nbytes: int) -> bytes:
    """The bin32 header of one frame of ``nbytes`` bytes."""
    return b"\xc6" + struct.pack(">I", nbytes)


def encode_items(frames: Iterable[bytes | None]) -> Iterator[bytes]:
    """The stream's pieces (headers and frames, not joined: no copy of the frames)."""
    for frame in frames:
        if frame is None:
            yield NIL
        else:
            yield item_header(len(frame))
            yield frame


def encode_parts(frames: Iterable[tuple[bytes, memoryview] | None]) -> Iterator[bytes | memoryview]:
    """The stream's pieces from frames given as (header, payload) pairs (``encode_frame_parts``)."""
    for frame in frames:
        if frame is None:
            yield NIL
        else:
            head, payload = frame
            yield item_header(len(head) + payload.nbytes)
            yield head
            yield payload


def split_items(buf, *, max_items: int) -> list[memoryview | None]:
    """The items of a stream as views into ``buf`` (``None`` for nil); BadRequest names the bad item."""
    view = memoryview(buf).cast("B")
    items: list[memoryview | None] = []
    pos, end = 0, len(view)
    while pos < end:
        i = len(items)
        if i >= max_items:
            raise BadRequest(f"the body holds more than {max_items} items (max_blocks_per_request)", field=f"frames[{i}]")
        tag = view[pos]
        if tag == 0xC0:
            items.append(None)
            pos += 1
            continue
        width = _BIN_SIZES.get(tag)
        if width is None:
            raise BadRequest(
                f"item {i} at byte {pos} is not a msgpack bin (tag 0x{tag:02x}); the body must be a "
                f"msgpack stream of bin items, one frame each",
                field=f"frames[{i}]",
            )
        if pos + 1 + width > end:
            raise BadRequest(f"item {i} is truncated: its length header runs past the end of the body", field=f"frames[{i}]")
        size = int.from_bytes(view[pos + 1 : pos + 1 + width], "big")
        start = pos + 1 + width
        if start + size > end:
            raise BadRequest(f"item {i} is truncated: it declares {size} bytes, {end - start} remain", field=f"frames[{i}]")
        items.append(view[start : start + size])
        pos = start + size
    return items


# -- tensors in request and answer bodies (/v1/retrieve, /v1/attention) ----------------------
# A tensor is a map ``{"dtype": str, "shape": [int, ...], "data": bytes}``: the raw little-endian
# elements in C order (msgpack ``bin``; in a JSON body ``data`` is the same bytes in base64).
MSGPACK_MEDIA_TYPE = "application/msgpack"
TENSOR_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "int32": "int32", "int64": "int64"}


def tensor_to_wire(t, *, binary: bool = True) -> dict:
    """``{"dtype", "shape", "data"}`` of a CPU tensor (``data`` bytes, or base64 text when not ``binary``)."""
    import base64

    from kvtier.kvstore.codecs.base import tensor_bytes

    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in TENSOR_DTYPES:
        raise ValueError(f"a wire tensor's dtype must be one of {sorted(TENSOR_DTYPES)}, got {t.dtype}")
    data = bytes(tensor_bytes(t)) if t.numel() else b""
    return {"dtype": name, "shape": list(t.shape), "data": data if binary else base64.b64encode(data).decode("ascii")}


def tensor_from_wire(obj, field: str, *, dtypes=("float16", "bfloat16", "float32"), ndim: int | None = None, max_elements: int = 1 << 26):
    """The tensor of a wire map (a fresh, writable CPU tensor); BadRequest names the bad part of ``field``."""
    import base64
    import binascii
    import math

    import torch

    from kvtier.kvstore.codecs.base import tensor_from_bytes

    if not isinstance(obj, dict):
        raise BadRequest(f"{field} must be a tensor: a map {{dtype, shape, data}}, got {type(obj).__name__}", field=field)
    extra = set(obj) - {"dtype", "shape", "data"}
    if extra:
        raise BadRequest(f"{field} has unknown fields {sorted(map(str, extra))}; a tensor is {{dtype, shape, data}}", field=field)
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype not in dtypes:
        raise BadRequest(f"{field}.dtype must be one of {list(dtypes)}, got {dtype!r}", field=f"{field}.dtype")
    if not isinstance(shape, (list, tuple)) or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in shape):
        raise BadRequest(f"{field}.shape must be a list of non-negative integers, got {shape!r}"[:300], field=f"{field}.shape")
    if ndim is not None and len(shape) != ndim:
        raise BadRequest(f"{field}.shape must have {ndim} dimensions, got {len(shape)}", field=f"{field}.shape")
    n = math.prod(shape)
    if n > max_elements:
        raise BadRequest(f"{field} has {n} elements, at most {max_elements} are allowed", field=f"{field}.shape")
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{field}.data must be base64 text (JSON) or bytes (msgpack)", field=f"{field}.data") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRequest(
            f"{field}.data must be bytes (msgpack bin) or base64 text (JSON), got {type(data).__name__}", field=f"{field}.data"
        )
    tdtype = getattr(torch, str(dtype))  # one of dtypes
    itemsize = torch.empty((), dtype=tdtype).element_size()
    if len(data) != n * itemsize:
        raise BadRequest(
            f"{field}.data holds {len(data)} bytes, shape {list(shape)} of {dtype} needs {n * itemsize}", field=f"{field}.data"
        )
    if n == 0:
        return torch.zeros(shape, dtype=tdtype)
    return tensor_from_bytes(bytearray(data), tdtype, tuple(shape))
