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
    header: dict[str, Any] = {
        "v": FRAME_VERSION,
        "key": bytes(key),
        "spec": spec.to_dict(),
        "codec": codec,
        "codec_meta": codec_meta,
        "shape": list(shape),
        "dtype": dtype,
        "checksum_alg": CHECKSUM_ALG,
        "checksum": checksum(view),
    }
    packer = msgpack.Packer()
    head = bytearray(packer.pack_map_header(len(header) + 1))
    for k, v in header.items():
        head += packer.pack(k)
        head += packer.pack(v)
    head += packer.pack("data") + _BIN32 + struct.pack(">I", view.nbytes)
    return bytes(head), view


def frame_overhead(frame: bytes | memoryview) -> int:
    """Bytes of a frame that are not payload (for accounting)."""
    return len(frame) - len(decode_frame(frame).data)


def decode_frame(buf, expect_key: bytes | None = None, expect_spec: KVSpec | None = None) -> Frame:
    """Parse and verify a frame. Raises FrameError on any mismatch or corruption."""
    view = memoryview(buf).cast("B")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=_MAX_HEADER + 64)
    unpacker.feed(view[: _MAX_HEADER])
    fields: dict[str, Any] = {}
    data = None
    try:
        n = unpacker.read_map_header()
        for _ in range(n):
            name = unpacker.unpack()
            if name == "data":
                pos = unpacker.tell()
                if view[pos : pos + 1] != _BIN32 or len(view) < pos + 5:
                    raise FrameError("frame data is not a bin32 at the end of the frame")
                (size,) = struct.unpack(">I", view[pos + 1 : pos + 5])
                if len(view) != pos + 5 + size:
                    raise FrameError(f"frame is truncated or has trailing bytes: data needs {size} bytes, {len(view) - pos - 5} present")
                data = view[pos + 5 :]
                break
            fields[name] = unpacker.unpack()
    except FrameError:
        raise
    except Exception as e:  # msgpack raises several types for garbage input
        raise FrameError(f"not a valid frame: {type(e).__name__}: {e}") from None
    if data is None:
        raise FrameError("frame has no data field")
    try:
        if fields.get("v") != FRAME_VERSION:
            raise FrameError(f"unsupported frame version {fields.get('v')!r}")
        key = fields["key"]
        spec = KVSpec.from_dict(fields["spec"])
        frame = Frame(
            key=bytes(key),
            spec=spec,
            codec=str(fields["codec"]),
            codec_meta=dict(fields["codec_meta"]),
            shape=tuple(int(s) for s in fields["shape"]),
            dtype=str(fields["dtype"]),
            checksum=int(fields["checksum"]),
            data=data,
        )
        alg = fields.get("checksum_alg", CHECKSUM_ALG)
    except FrameError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise FrameError(f"frame header is invalid: {e}") from None
    if alg != CHECKSUM_ALG:
        raise FrameError(f"unknown checksum algorithm {alg!r}")
    if len(frame.key) != HASH_BYTES:
        raise FrameError("frame key is not a 32-byte hash")
    if expect_key is not None and frame.key != bytes(expect_key):
        raise FrameError("frame key does not match the key asked for")
    if expect_spec is not None and frame.spec != expect_spec:
        raise FrameError(f"frame spec {frame.spec} does not match the spec asked for {expect_spec}")
    if checksum(data) != frame.checksum:
        raise FrameError("frame checksum mismatch")
    return frame
