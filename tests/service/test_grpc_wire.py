"""``grpc_wire`` writes and reads the same bytes as protobuf's classes for PutRequest and BlockReply."""

from __future__ import annotations

import random

import pytest

from kvtier.service import grpc_wire
from kvtier.service.proto import kvtier_pb2 as pb


def test_put_request_round_trips_with_protobuf():
    frame = random.Random(0).randbytes(5000)
    raw = grpc_wire.put_request([frame[:100], memoryview(frame)[100:]], "m" * 64, b"\x01" * 32)
    msg = pb.PutRequest.FromString(raw)
    assert (msg.model, msg.parent, msg.frame) == ("m" * 64, b"\x01" * 32, frame)
    assert raw == msg.SerializeToString()
    got = grpc_wire.parse_put_request(pb.PutRequest(model="x", parent=b"p", frame=frame).SerializeToString())
    assert (got.model, got.parent, bytes(got.frame)) == ("x", b"p", frame)
    assert isinstance(got.frame, memoryview)
    empty = grpc_wire.parse_put_request(grpc_wire.put_request([b""]))
    assert (empty.model, empty.parent, bytes(empty.frame)) == ("", b"", b"")


def test_block_reply_round_trips_with_protobuf():
    frame = random.Random(1).randbytes(3000)
    raw = grpc_wire.block_reply(b"k" * 32, [frame[:10], memoryview(frame)[10:]])
    msg = pb.BlockReply.FromString(raw)
    assert (msg.key, msg.found, msg.frame) == (b"k" * 32, True, frame) and raw == msg.SerializeToString()
    miss = pb.BlockReply.FromString(grpc_wire.block_reply(b"k" * 32))
    assert (miss.key, miss.found, miss.frame) == (b"k" * 32, False, b"")
    got = grpc_wire.parse_block_reply(pb.BlockReply(key=b"a", found=True, frame=frame).SerializeToString())
    assert (got.key, got.found, bytes(got.frame)) == (b"a", True, frame)


def test_unknown_fields_are_skipped_and_the_last_occurrence_wins():
    raw = (
        pb.PutRequest(frame=b"old").SerializeToString()
        + b"\x48\x96\x01"  # field 9, varint 150
        + b"\x51\x00\x00\x00\x00\x00\x00\x00\x00"  # field 10, fixed64
        + b"\x5d\x00\x00\x00\x00"  # field 11, fixed32
        + b"\x62\x03abc"  # field 12, length-delimited
        + pb.PutRequest(model="m", frame=b"new").SerializeToString()
    )
    got = grpc_wire.parse_put_request(raw)
    assert (got.model, bytes(got.frame)) == ("m", b"new")


@pytest.mark.parametrize(
    "raw",
    [
        b"\x1a\x05abc",  # the frame runs past the message
        b"\x1a",  # a length cut off
        b"\x1a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an overlong varint
        b"\x08\x01",  # model (a string) as a varint
        b"\x1b",  # wire type 3 (groups): not used by these messages
        b"\x51\x00",  # a fixed64 cut off
        b"\x0a\x02\xff\xfe",  # model not UTF-8
        b"\x00\x00",  # field number 0
    ],
)
def test_malformed_messages_raise_value_error(raw):
    with pytest.raises(ValueError):
        grpc_wire.parse_put_request(raw)
