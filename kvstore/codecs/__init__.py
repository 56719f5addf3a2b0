"""Block codecs. Importing this package registers every built-in codec and lossless stage:
``identity``, ``fp8``, ``int8``, ``kivi4``, ``kivi2`` and the stages ``zstd`` and ``lz4``."""

from . import fp8, identity, int8, kivi, lossless  # noqa: F401  (register the codecs and stages)
from .base import Codec, available_codecs, get_codec, register_codec, register_stage
from .quant import ErrorBound, codec_bits_per_element, codec_error_bound, codec_max_error

__all__ = [
    "Codec",
    "ErrorBound",
    "available_codecs",
    "codec_bits_per_element",
    "codec_error_bound",
    "codec_max_error",
    "get_codec",
    "register_codec",
    "register_stage",
]
