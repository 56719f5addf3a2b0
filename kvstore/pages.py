"""Page reads: the layout of a page-addressable block and the pieces of it a reader asks for.

A block stored with a ``paged`` codec (``kvstore.codecs.paged``) is, after its frame header, a run
of fixed-size ranges — one per (layer, KV head, page of 16 tokens), K then V — followed by its
page summaries. ``PageLayout`` is what a reader needs to address and verify those bytes without
reading the block: the sizes and the checksum of every range and summary section, all taken
from the header (``codec_meta``). Offsets here are relative to the payload; each tier adds where
the payload starts in what it stores (0 in memory, the header's length in a frame).

A reader asks for *pieces*:

- ``Pages(first, num)``: ``num`` consecutive ranges from range id ``first`` (the pages of one
  (layer, head) are consecutive ids, so a head's selected pages in one block coalesce);
- ``Summary(layer)``: one layer's page summaries (``kmin, kmax, kmean [H_kv, Np, D]``), or, with
  ``layer == num_layers``, the block-level bounds (``bmin, bmax [L, H_kv, D]``);
- ``Summary(layer, head)``: one KV head's page summaries of one layer (``kmin, kmax, kmean
  [Np, D]``), one contiguous range with its own checksum: only in blocks written with summary
  layout 2 (``PageLayout.head_summaries``; older frames serve whole layers, ValueError otherwise).

Every piece is verified against its checksums before it is handed back: a piece that does not
match is a miss (``None``), never wrong KV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import xxhash

from .codecs import Codec, get_codec
from .codecs.paged import PagedCodec
from .spec import KVSpec


class Pages(NamedTuple):
    first: int  # range id of the first page: (layer * H_kv + head) * Np + page
    num: int  # how many ranges


class Summary(NamedTuple):
    layer: int  # a layer id, or num_layers for the block-level bounds
    head: int | None = None  # one KV head's section of the layer (summary layout 2), or the whole layer


Piece = Pages | Summary


@dataclass(frozen=True)
class PageLayout:
    """Where each piece of one stored paged block lies, and its checksums."""

    key: bytes
    spec: KVSpec
    codec: PagedCodec
    meta: dict
    crc: np.ndarray  # [R] uint64, one per range
    sum_crc: np.ndarray  # uint64: per (layer, head) [L * H_kv] (layout 2) or per layer [L] (layout 1), then the block level

    @classmethod
    def from_meta(cls, key: bytes, spec: KVSpec, codec_name: str | Codec, meta: dict) -> "PageLayout | None":
        """The layout of a block stored with ``codec_name`` (or the codec itself) and ``meta``; ``None`` if that codec is
        not page-addressable. ValueError if the meta is not valid for the codec and spec."""
        codec = get_codec(codec_name) if isinstance(codec_name, str) else codec_name
        if not isinstance(codec, PagedCodec):
            return None
        codec.check_meta(meta, spec)
        return cls(
            bytes(key), spec, codec, meta, np.frombuffer(meta["crc"], dtype=np.uint64), np.frombuffer(meta["sum_crc"], dtype=np.uint64)
        )

    # -- geometry --------------------------------------------------------------------------
    @property
    def page_tokens(self) -> int:
        return self.codec.page_tokens

    @property
    def pages_per_block(self) -> int:
        return self.spec.block_tokens // self.codec.page_tokens

    @property
    def range_bytes(self) -> int:
        return self.meta["range_bytes"]

    @property
    def num_ranges(self) -> int:
        return self.meta["ranges"]

    @property
    def summary_dtype(self) -> torch.dtype:
        return torch.float16 if self.meta["sum_dtype"] == "float16" else torch.float32

    @property
    def head_summaries(self) -> bool:
        """Whether one (layer, KV head)'s page summaries are one separately verified range (layout 2)."""
        return self.meta.get("sum_v", 1) >= 2

    def range_id(self, layer: int, head: int, page: int) -> int:
        return (layer * self.spec.num_kv_heads + head) * self.pages_per_block + page

    def span(self, piece: Piece) -> tuple[int, int]:
        """``(offset, nbytes)`` of a piece in the payload; ValueError for a piece out of range."""
        if isinstance(piece, Pages):
            first, num = piece
            if num <= 0 or first < 0 or first + num > self.num_ranges:
                raise ValueError(f"pages {first}..{first + num} are outside the block's {self.num_ranges} ranges")
            return first * self.range_bytes, num * self.range_bytes
        layer = piece.layer
        L = self.spec.num_layers
        if not 0 <= layer <= L:
            raise ValueError(f"summary layer must be in [0, {L}], got {layer}")
        lb = self.meta["sum_layer_bytes"]
        head = piece.head
        if head is not None:
            H = self.spec.num_kv_heads
            if not self.head_summaries:
                raise ValueError("this block's summaries are per layer (layout 1): read Summary(layer), not one head's")
            if layer == L or not 0 <= head < H:
                raise ValueError(f"a head's summary needs a layer in [0, {L}) and a head in [0, {H}), got ({layer}, {head})")
            hb = lb // H
            return self.meta["sum_offset"] + layer * lb + head * hb, hb
        if layer < L:
            return self.meta["sum_offset"] + layer * lb, lb
        bl = 2 * L * self.spec.num_kv_heads * self.spec.head_dim * self.summary_dtype.itemsize
        return self.meta["sum_offset"] + L * lb, bl

    def verify(self, piece: Piece, buf) -> bool:
        """Whether ``buf`` holds exactly the piece's bytes (every checksum matches)."""
        view = memoryview(buf).cast("B")
        if view.nbytes != self.span(piece)[1]:
            return False
        h = xxhash.xxh3_64_intdigest
        if isinstance(piece, Summary):
            L = self.spec.num_layers
            if piece.layer == L:
                return h(view) == int(self.sum_crc[-1])
            if not self.head_summaries:
                return h(view) == int(self.sum_crc[piece.layer])
            H = self.spec.num_kv_heads
            if piece.head is not None:
                return h(view) == int(self.sum_crc[piece.layer * H + piece.head])
            hb = view.nbytes // H
            return all(h(view[i * hb : (i + 1) * hb]) == int(self.sum_crc[piece.layer * H + i]) for i in range(H))
        rb = self.range_bytes
        crc = self.crc
        for i in range(piece.num):
            if h(view[i * rb : (i + 1) * rb]) != int(crc[piece.first + i]):
                return False
        return True

    # -- decoding --------------------------------------------------------------------------
    def decode_pages(self, buf, num: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``num`` ranges' bytes as ``[num, 2, P, D]`` (K and V of each page)."""
        return self.codec.decode_ranges(buf, num, self.spec, dtype)

    def decode_summary(self, layer: int, buf, head: int | None = None) -> tuple[torch.Tensor, ...]:
        """A layer's ``(kmin, kmax, kmean)`` ``[H_kv, Np, D]`` (with ``head``: that head's, ``[Np, D]``,
        from a ``Summary(layer, head)`` piece), or the block level's ``(bmin, bmax)`` ``[L, H_kv, D]``
        for ``layer == num_layers``; in ``summary_dtype`` (float16 for float16 blocks)."""
        H, D, L = self.spec.num_kv_heads, self.spec.head_dim, self.spec.num_layers
        t = torch.frombuffer(bytearray(memoryview(buf).cast("B")), dtype=self.summary_dtype)
        Np = self.pages_per_block
        if head is not None:
            return tuple(t.view(3, Np, D).unbind(0))
        if layer < L:
            if self.head_summaries:
                return tuple(t.view(H, 3, Np, D).transpose(0, 1).unbind(0))
            return tuple(t.view(3, H, Np, D).unbind(0))
        return tuple(t.view(2, L, H, D).unbind(0))


def coalesce(range_ids: Sequence[int]) -> list[Pages]:
    """Sorted distinct range ids as runs of consecutive ids."""
    out: list[Pages] = []
    for r in sorted(set(int(x) for x in range_ids)):
        if out and out[-1].first + out[-1].num == r:
            out[-1] = Pages(out[-1].first, out[-1].num + 1)
        else:
            out.append(Pages(r, 1))
    return out


@dataclass
class PieceReads:
    """What ``TieredStore.read_pieces`` read: per request, the verified bytes of each piece asked
    (in order), or ``None`` when the block could not be read whole and verified from any tier."""

    pieces: list[list[memoryview] | None]
    bytes_by_tier: dict[str, int]  # payload bytes read, per tier
    reads_by_tier: dict[str, int]  # spans read (one GETRANGE / pread / view each), per tier
    mismatches: int = 0  # pieces whose checksum did not match (tried on the next tier holding the block)
