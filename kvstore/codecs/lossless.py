"""Lossless stages: ``zstd`` and ``lz4`` wrapped around any codec (``kivi4+zstd``, ``identity+lz4``).

A stage compresses the payload of the codec it wraps and restores it bit for bit. When
compressing does not make the payload smaller (already dense codes), the stage stores it as it
is, so a stage never makes a payload larger. Meta: ``{inner: <the wrapped codec's meta>,
n: <bytes of the inner payload>, packed: <whether the payload is compressed>}``. Any corruption
the decompressor notices, or a size that does not match ``n``, is a ValueError. zstd payloads
carry zstd's own content checksum (4 bytes), so any damage to them is noticed; lz4 block payloads
have none, so damage that keeps them well-formed is left to the frame checksum of the tiers.
"""

from __future__ import annotations

import copy

import threading

import torch

from kvtier.checks import check_int

from ..spec import KVSpec
from .base import Codec, codec_for_block, register_stage
from .quant import check_meta, codec_bits_per_element, codec_error_bound, codec_max_error

ZSTD_LEVEL = 1  # on a kivi4 payload of the reference model: level 1 compresses 4x faster than 3 (2.4 vs 9.4 ms per 1.8 MB) to within 0.2%
_local = threading.local()  # zstd (de)compressor objects are not thread-safe: one per thread


def _max_inner_bytes(spec: KVSpec) -> int:
    """No codec's payload is larger than this (a guard against decompression bombs)."""
    return 2 * spec.block_nbytes + (1 << 20)


class _Stage:
    kind = ""

    def __init__(self, inner: Codec) -> None:
        self.inner = inner
        self.name = f"{inner.name}+{self.kind}"
        self.lossless = inner.lossless

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def for_block(self, first: bool):
        """This stage around the inner codec's variant for the block's place (see ``codec_for_block``)."""
        inner = codec_for_block(self.inner, first)
        if inner is self.inner:
            return self
        stage = copy.copy(self)
        stage.inner = inner
        return stage

    @property
    def error_bound(self):
        return codec_error_bound(self.inner)

    def bits_per_element(self, spec: KVSpec) -> float:
        """An upper bound: the wrapped codec's bits (the stage never makes a payload larger)."""
        return codec_bits_per_element(self.inner, spec)

    def max_error(self, block: torch.Tensor, spec: KVSpec) -> torch.Tensor:
        return codec_max_error(self.inner, block, spec)

    def _compress(self, data: memoryview) -> bytes:
        raise NotImplementedError

    def _decompress(self, data: memoryview, n: int) -> bytes:
        raise NotImplementedError

    def encode(self, block: torch.Tensor, spec: KVSpec):
        payload, meta = self.inner.encode(block, spec)
        raw = memoryview(payload).cast("B")
        packed = self._compress(raw)
        if len(packed) < raw.nbytes:
            return packed, {"inner": meta, "n": raw.nbytes, "packed": True}
        return raw, {"inner": meta, "n": raw.nbytes, "packed": False}

    def decode(self, payload, meta: dict, spec: KVSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        check_meta(meta, self.name, {"inner": (dict, None), "n": (int, None), "packed": (bool, None)})
        n = meta["n"]
        if not 0 <= n <= _max_inner_bytes(spec):
            raise ValueError(f"{self.name} meta n={n} is not a payload size for this spec")
        try:
            data = memoryview(payload).cast("B")
        except TypeError as e:
            raise ValueError(f"{self.name} payload must be a bytes-like buffer: {e}") from None
        raw: bytes | memoryview
        if meta["packed"]:
            try:
                raw = self._decompress(data, n)
            except ValueError:
                raise
            except Exception as e:  # the libraries raise their own error types on corrupt input
                raise ValueError(f"{self.name}: corrupt compressed payload: {type(e).__name__}: {e}") from None
            if len(raw) != n:
                raise ValueError(f"{self.name}: payload decompressed to {len(raw)} bytes, expected {n}")
        else:
            if data.nbytes != n:
                raise ValueError(f"{self.name}: stored payload has {data.nbytes} bytes, expected {n}")
            raw = data
        return self.inner.decode(raw, meta["inner"], spec, out=out)


class ZstdStage(_Stage):
    kind = "zstd"

    def __init__(self, inner: Codec, level: int = ZSTD_LEVEL) -> None:
        check_int("zstd level", level, low=-7, high=22)
        super().__init__(inner)
        self.level = level

    def _compress(self, data: memoryview) -> bytes:
        import zstandard

        cache = getattr(_local, "zstd_c", None)
        if cache is None:
            cache = _local.zstd_c = {}
        comp = cache.get(self.level)
        if comp is None:
            comp = cache[self.level] = zstandard.ZstdCompressor(level=self.level, write_checksum=True, write_content_size=True)
        return comp.compress(data)

    def _decompress(self, data: memoryview, n: int) -> bytes:
        import zstandard

        dec = getattr(_local, "zstd_d", None)
        if dec is None:
            dec = _local.zstd_d = zstandard.ZstdDecompressor()
        try:
            # the frame header says how large the content is: refuse before allocating it
            size = zstandard.frame_content_size(data)
            if size != n:
                raise ValueError(f"{self.name}: compressed payload declares {size} bytes, expected {n}")
            dobj = dec.decompressobj()
            raw = dobj.decompress(data)
            if not dobj.eof or dobj.unused_data:
                raise ValueError(f"{self.name}: compressed payload is truncated or has trailing bytes")
            return raw
        except zstandard.ZstdError as e:
            raise ValueError(f"{self.name}: corrupt compressed payload: {e}") from None


class Lz4Stage(_Stage):
    kind = "lz4"

    def _compress(self, data: memoryview) -> bytes:
        import lz4.block

        return lz4.block.compress(data, store_size=False)

    def _decompress(self, data: memoryview, n: int) -> bytes:
        import lz4.block

        try:
            return lz4.block.decompress(data, uncompressed_size=n)
        except lz4.block.LZ4BlockError as e:
            raise ValueError(f"{self.name}: corrupt compressed payload: {e}") from None


register_stage("zstd", ZstdStage)
register_stage("lz4", Lz4Stage)
