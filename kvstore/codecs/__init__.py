"""Block codecs. Importing this package registers every built-in codec and lossless stage:
``identity``, ``fp8``, ``int8``, ``kivi4``, ``kivi2``, ``kivi2h``, the page-addressable
``paged`` and ``paged_int8``, and the stages ``zstd`` and
``lz4`` (``get_codec("kivi4+zstd")``)."""

from . import fp8, identity, int8, kivi, lossless, paged  # noqa: F401  (register the codecs and stages)
from .base import Codec, available_codecs, codec_for_block, get_codec, register_codec, register_stage
from .fp8 import Fp8Codec
from .int8 import Int8Codec
from .kivi import KiviCodec
from .lossless import Lz4Stage, ZstdStage
from .paged import PagedCodec
from .quant import ErrorBound, codec_bits_per_element, codec_error_bound, codec_max_error

__all__ = [
    "Codec",
    "ErrorBound",
    "Fp8Codec",
    "Int8Codec",
    "KiviCodec",
    "PagedCodec",
    "Lz4Stage",
    "ZstdStage",
    "available_codecs",
    "codec_bits_per_element",
    "codec_error_bound",
    "codec_max_error",
    "get_codec",
    "codec_for_block",
    "register_codec",
    "register_stage",
]
