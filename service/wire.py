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
            raise BadRequest(f"item {i} at byte {pos} is not a msgpack bin (tag 0x{tag:02x}); the body must be a "
                             f"msgpack stream of bin items, one frame each", field=f"frames[{i}]")
        if pos + 1 + width > end:
            raise BadRequest(f"item {i} is truncated: its length header runs past the end of the body", field=f"frames[{i}]")
        size = int.from_bytes(view[pos + 1: pos + 1 + width], "big")
        start = pos + 1 + width
        if start + size > end:
            raise BadRequest(f"item {i} is truncated: it declares {size} bytes, {end - start} remain", field=f"frames[{i}]")
        items.append(view[start: start + size])
        pos = start + size
    return items
