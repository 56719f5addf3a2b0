"""The msgpack stream of frames and the upload buffer pool (no server)."""

from __future__ import annotations

import msgpack
import pytest
import torch

from kvtier.kvstore import chain_hashes, decode_frame
from kvtier.service import wire
from kvtier.service.buffers import BufferPool
from kvtier.service.client import decode_blocks, encode_blocks
from kvtier.service.errors import BadRequest

from .conftest import TINY


def test_stream_roundtrip_and_any_decoder_reads_it():
    keys = chain_hashes(TINY, list(range(48)))
    blocks = torch.randn(3, *TINY.block_shape).half()
    body = b"".join(encode_blocks(TINY, keys, blocks)) + wire.NIL
    items = wire.split_items(body, max_items=10)
    assert [i is None for i in items] == [False, False, False, True]
    assert [bytes(decode_frame(i).key) for i in items[:3]] == keys
    assert len(list(_unpack(body))) == 4  # a plain msgpack decoder reads the same 4 items
    got = decode_blocks(TINY, keys + [bytes(32)], body)
    assert all(torch.equal(g, b) for g, b in zip(got, blocks)) and got[3] is None


def _unpack(body: bytes):
    u = msgpack.Unpacker()
    u.feed(body)
    return u


@pytest.mark.parametrize(
    "body, field",
    [
        (b"\x01", "frames[0]"),
        (b"\xc6\x00\x00", "frames[0]"),
        (b"\xc4\x05abc", "frames[0]"),
        (b"\xc0\xc0\xc0", "frames[2]"),
    ],
)
def test_split_items_rejects_with_the_item(body, field):
    with pytest.raises(BadRequest) as e:
        wire.split_items(body, max_items=2)
    assert e.value.field == field


def test_buffer_pool_reuses_and_stays_bounded():
    pool = BufferPool(max_bytes=3 << 10)
    a, b = pool.take(1 << 10, 2)
    pool.give([a, b])
    assert pool.idle_bytes == 2 << 10
    c = pool.take(1 << 10)[0]
    assert c.data_ptr() in (a.data_ptr(), b.data_ptr())  # reused
    pool.give([torch.empty(2 << 10, dtype=torch.uint8), c])  # 2 KiB + 1 KiB idle would pass 3 KiB: one is dropped
    assert pool.idle_bytes <= 3 << 10
