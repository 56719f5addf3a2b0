"""The two gRPC messages that carry blocks, written and read without protobuf's copies.

``PutRequest`` and ``BlockReply`` (``proto/kvtier.proto``) each carry one frame of up to
``max_block_bytes``. Through protobuf's Python classes a frame is copied four times on each side:
into the message (constructor or parse), out of it (each read of ``msg.frame`` makes a new
``bytes``), and by ``SerializeToString``. gRPC itself hands a serializer's ``bytes`` to its core,
and a deserializer the received message as one ``bytes``; the rest can be avoided:

- writing: the message is built by joining its small fields with the frame's header and a view of
  the block's memory, one copy in all (``put_request``, ``block_reply``);
- reading: the message is walked once (protobuf's wire format: tag, length, value) and the frame is
  a ``memoryview`` of the received bytes, no copy (``parse_put_request``, ``parse_block_reply``).

The bytes are protobuf's wire format for the same messages, so a client or server in any language
speaks with these; unknown fields are skipped and, as protobuf does, the last occurrence of a field
wins. These functions are the serializers of the ``PutBlocks`` and ``GetBlocks`` methods on both
sides (``grpc_server.add_servicer``, ``grpc_client``); every other method uses the generated code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["BlockMessage", "PutMessage", "block_reply", "parse_block_reply", "parse_put_request", "put_request"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    n = shift = 0
    end = len(buf)
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7


def _fields(raw) -> dict[int, int | memoryview]:
    """Field number -> its last value: an int (varint) or a view (length-delimited); others skipped."""
    buf = memoryview(raw).cast("B") if not isinstance(raw, memoryview) else raw
    out: dict[int, int | memoryview] = {}
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        num, kind = tag >> 3, tag & 7
        if num == 0:
            raise WireError("field number 0")
        if kind == _VARINT:
            out[num], pos = _read_varint(buf, pos)
        elif kind == _LEN:
            n, pos = _read_varint(buf, pos)
            if pos + n > end:
                raise WireError("a length-delimited field runs past the message")
            out[num] = buf[pos : pos + n]
            pos += n
        elif kind == _I64:
            pos += 8
        elif kind == _I32:
            pos += 4
        else:
            raise WireError(f"unsupported wire type {kind}")
    if pos != end:
        raise WireError("a fixed-size field runs past the message")
    return out


def _len_field(num: int, size: int) -> bytes:
    return _varint(num << 3 | _LEN) + _varint(size)


def _size(part) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)


@dataclass
class PutMessage:
    """A ``PutRequest`` as read: ``frame`` is a view of the received bytes."""

    model: str
    parent: bytes
    frame: memoryview


@dataclass
class BlockMessage:
    """A ``BlockReply`` as read: ``frame`` is a view of the received bytes."""

    key: bytes
    found: bool
    frame: memoryview


def put_request(frame_parts: Sequence, model: str = "", parent: bytes = b"") -> bytes:
    """A ``PutRequest``'s bytes: ``frame_parts`` (e.g. the header and a view of the payload) joined into
    its frame field, the one copy of the block."""
    head = b""
    if model:
        m = model.encode()
        head += _len_field(1, len(m)) + m
    if parent:
        head += _len_field(2, len(parent)) + bytes(parent)
    head += _len_field(3, sum(_size(p) for p in frame_parts))
    return b"".join([head, *frame_parts])


def parse_put_request(raw: bytes) -> PutMessage:
    f = _fields(raw)
    model, parent, frame = f.get(1, b""), f.get(2, b""), f.get(3, memoryview(b""))
    if isinstance(model, int) or isinstance(parent, int) or not isinstance(frame, memoryview):
        raise WireError("PutRequest: a field has the wrong wire type")
    try:
        name = bytes(model).decode()
    except UnicodeDecodeError:
        raise WireError("PutRequest.model is not UTF-8") from None
    return PutMessage(name, bytes(parent), frame)


def block_reply(key: bytes, frame_parts: Sequence = ()) -> bytes:
    """A ``BlockReply``'s bytes: found with ``frame_parts`` joined into its frame (one copy), or not found."""
    head = _len_field(1, len(key)) + bytes(key)
    if not frame_parts:
        return head
    head += b"\x10\x01" + _len_field(3, sum(_size(p) for p in frame_parts))  # found = true
    return b"".join([head, *frame_parts])


def parse_block_reply(raw: bytes) -> BlockMessage:
    f = _fields(raw)
    key, found, frame = f.get(1, b""), f.get(2, 0), f.get(3, memoryview(b""))
    if isinstance(key, int) or isinstance(found, memoryview) or not isinstance(frame, memoryview):
        raise WireError("BlockReply: a field has the wrong wire type")
    return BlockMessage(bytes(key), bool(found), frame)
