"""Frames: how a block travels once it leaves process memory.

A frame is one msgpack map::

    {v, key, spec, codec, codec_meta, shape, dtype, checksum, data}

``checksum`` is XXH3-64 over ``data`` (``checksum_alg`` names it). ``data`` is always the last
entry and always a bin32, so encoding writes the header once and the payload once, and decoding
slices the payload out of the received buffer without copying it. Any msgpack decoder reads a
frame as an ordinary map.

``decode_frame`` raises ``FrameError`` for anything wrong: truncated bytes, a bad checksum, a key
or spec that is not the one asked for. Tiers turn that into a miss and count it; a cache must
never hand back wrong KV.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from .keys import HASH_BYTES
from .spec import KVSpec

FRAME_VERSION = 1
CHECKSUM_ALG = "xxh3_64"
_MAX_HEADER = 1 << 20  # a header (everything but data) larger than this is not a frame of ours
_BIN32 = b"\xc6"


class FrameError(ValueError):
    """A frame that must not be used: corrupt, truncated, or not the block that was asked for."""


@dataclass(frozen=True)
class Frame:
    key: bytes
    spec: KVSpec
    codec: str
    codec_meta: dict
    shape: tuple[int, ...]
    dtype: str
    checksum: int
    data: memoryview  # a view into the buffer the frame was decoded from (no copy)


def checksum(data) -> int:
    return xxhash.xxh3_64_intdigest(data)


def encode_frame(
    key: bytes,
    spec: KVSpec,
    codec: str,
    codec_meta: dict,
    shape: tuple[int, ...],
    dtype: str,
    data,
) -> bytes:
    """One frame as bytes. ``data`` is any buffer (bytes, memoryview, numpy array)."""
    head, view = encode_frame_parts(key, spec, codec, codec_meta, shape, dtype, data)
    return b"".join((head, view))


def encode_frame_parts(
    key: bytes,
    spec: KVSpec,
    codec: str,
    codec_meta: dict,
    shape: tuple[int, ...],
    dtype: str,
    data,
) -> tuple[bytes, memoryview]:
    """A frame as (header, payload view): written one after the other they are ``encode_frame``'s
    bytes, without copying the payload (for writers that send pieces, e.g. a socket)."""
    if len(key) != HASH_BYTES:
        raise ValueError(f"key must be {HASH_BYTES} bytes, got {len(key)}")
    view = memoryview(data).cast("B")
    packer = msgpack.Packer()
    if not codec_meta:
        # the fields between the key and the checksum depend on the spec, codec, shape and dtype only: packed once
        # per such combination (the same bytes as packing them each time; 4 small blocks' get: 0.2 ms less)
        middle = _packed_middle(spec, codec, tuple(shape), dtype)
    else:
        middle = _pack_middle(packer, spec, codec, codec_meta, shape, dtype)
    head = bytearray(_HEAD_START)
    head += packer.pack(bytes(key))
    head += middle
    head += packer.pack(checksum(view))
    head += _DATA_NAME + struct.pack(">I", view.nbytes)
    return bytes(head), view


def _pack_middle(packer, spec: KVSpec, codec: str, codec_meta: dict, shape, dtype: str) -> bytes:
    """The packed fields from ``spec`` to ``checksum``'s name, in the header's order."""
    out = bytearray()
    for k, v in (
        ("spec", spec.to_dict()),
        ("codec", codec),
        ("codec_meta", codec_meta),
        ("shape", list(shape)),
        ("dtype", dtype),
        ("checksum_alg", CHECKSUM_ALG),
    ):
        out += packer.pack(k)
        out += packer.pack(v)
    out += packer.pack("checksum")
    return bytes(out)


@functools.lru_cache(maxsize=256)
def _packed_middle(spec: KVSpec, codec: str, shape: tuple[int, ...], dtype: str) -> bytes:
    return _pack_middle(msgpack.Packer(), spec, codec, {}, shape, dtype)


# a header is a map of 10 fields (v, key, spec, codec, codec_meta, shape, dtype, checksum_alg, checksum, data):
# its map header and version field, and the name and bin32 type of its last field
_HEAD_START = msgpack.Packer().pack_map_header(10) + msgpack.packb("v") + msgpack.packb(FRAME_VERSION) + msgpack.packb("key")
_DATA_NAME = msgpack.packb("data") + _BIN32


def frame_overhead(frame: bytes | memoryview) -> int:
    """Bytes of a frame that are not payload (for accounting)."""
    return len(frame) - len(decode_frame(frame).data)


@dataclass(frozen=True)
class FrameHeader:
    """Everything of a frame but its payload: where the payload lies in the frame, and its size.

    Read from a prefix of the frame (``decode_frame_header``), so a tier can serve byte ranges of
    the payload without reading the whole frame."""

    key: bytes
    spec: KVSpec
    codec: str
    codec_meta: dict
    shape: tuple[int, ...]
    dtype: str
    checksum: int
    data_offset: int  # bytes from the start of the frame to the first payload byte
    data_size: int


class FrameIncomplete(FrameError):
    """The bytes given end before the frame's header does: read at least ``need`` bytes."""

    def __init__(self, need: int) -> None:
        super().__init__(f"frame header needs at least {need} bytes")
        self.need = need


def _parse(view: memoryview, *, whole: bool) -> tuple[dict[str, Any], int, int]:
    """(header fields, payload offset, payload size) of the frame ``view`` starts with.

    ``whole``: ``view`` is the whole frame (its length must end exactly at the payload's end);
    otherwise a prefix, and ``FrameIncomplete`` says how many bytes the header needs."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=_MAX_HEADER + 64)
    unpacker.feed(view[:_MAX_HEADER])
    fields: dict[str, Any] = {}
    try:
        n = unpacker.read_map_header()
        for _ in range(n):
            name = unpacker.unpack()
            if name == "data":
                pos = unpacker.tell()
                if len(view) < pos + 5:
                    if whole or pos + 5 > _MAX_HEADER:
                        raise FrameError("frame data is not a bin32 at the end of the frame")
                    raise FrameIncomplete(pos + 5)
                if view[pos : pos + 1] != _BIN32:
                    raise FrameError("frame data is not a bin32 at the end of the frame")
                (size,) = struct.unpack(">I", view[pos + 1 : pos + 5])
                if whole and len(view) != pos + 5 + size:
                    raise FrameError(f"frame is truncated or has trailing bytes: data needs {size} bytes, {len(view) - pos - 5} present")
                return fields, pos + 5, size
            fields[name] = unpacker.unpack()
    except msgpack.OutOfData:
        if whole or len(view) >= _MAX_HEADER:
            raise FrameError("not a valid frame: truncated header") from None
        raise FrameIncomplete(min(_MAX_HEADER, max(4 * len(view), 4096))) from None
    except FrameError:
        raise
    except Exception as e:  # msgpack raises several types for garbage input
        raise FrameError(f"not a valid frame: {type(e).__name__}: {e}") from None
    raise FrameError("frame has no data field")


def _check_fields(fields: dict[str, Any], expect_key, expect_spec) -> tuple[bytes, KVSpec, str, dict, tuple, str, int]:
    try:
        if fields.get("v") != FRAME_VERSION:
            raise FrameError(f"unsupported frame version {fields.get('v')!r}")
        key = bytes(fields["key"])
        spec = KVSpec.from_dict(fields["spec"])
        parts = (
            key,
            spec,
            str(fields["codec"]),
            dict(fields["codec_meta"]),
            tuple(int(s) for s in fields["shape"]),
            str(fields["dtype"]),
            int(fields["checksum"]),
        )
        alg = fields.get("checksum_alg", CHECKSUM_ALG)
    except FrameError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise FrameError(f"frame header is invalid: {e}") from None
    if alg != CHECKSUM_ALG:
        raise FrameError(f"unknown checksum algorithm {alg!r}")
    if len(key) != HASH_BYTES:
        raise FrameError("frame key is not a 32-byte hash")
    if expect_key is not None and key != bytes(expect_key):
        raise FrameError("frame key does not match the key asked for")
    if expect_spec is not None and spec != expect_spec:
        raise FrameError(f"frame spec {spec} does not match the spec asked for {expect_spec}")
    return parts


def header_read_size(spec: KVSpec) -> int:
    """Bytes to read first to get a frame header of ``spec`` in one go, most of the time: room for
    a page-addressable codec's checksums (8 bytes per 16-token page, head and layer, and per
    summary layer) plus 2 KiB for the rest; at least 4 KiB, at most the header limit."""
    ranges = spec.num_layers * spec.num_kv_heads * max(1, spec.block_tokens // 16)
    return max(4096, min(_MAX_HEADER, 8 * (ranges + spec.num_layers + 1) + 2048))


def decode_frame_header(prefix, expect_key: bytes | None = None, expect_spec: KVSpec | None = None) -> FrameHeader:
    """The header of the frame ``prefix`` starts with (any prefix that holds the whole header).

    Raises ``FrameIncomplete`` (with ``need``) when ``prefix`` is too short, ``FrameError`` for
    anything wrong. The payload is not read, so its checksum is not verified here: whoever reads
    payload bytes verifies them (``kvstore.pages`` checks every page range it serves)."""
    view = memoryview(prefix).cast("B")
    fields, offset, size = _parse(view, whole=False)
    key, spec, codec, meta, shape, dtype, crc = _check_fields(fields, expect_key, expect_spec)
    return FrameHeader(key, spec, codec, meta, shape, dtype, crc, offset, size)


def decode_frame(buf, expect_key: bytes | None = None, expect_spec: KVSpec | None = None) -> Frame:
    """Parse and verify a frame. Raises FrameError on any mismatch or corruption."""
    view = memoryview(buf).cast("B")
    fields, offset, size = _parse(view, whole=True)
    data = view[offset:]
    key, spec, codec, meta, shape, dtype, crc = _check_fields(fields, expect_key, expect_spec)
    frame = Frame(key=key, spec=spec, codec=codec, codec_meta=meta, shape=shape, dtype=dtype, checksum=crc, data=data)
    if checksum(data) != frame.checksum:
        raise FrameError("frame checksum mismatch")
    return frame
