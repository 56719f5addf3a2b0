"""Block codecs. Importing this package registers every built-in codec."""

from . import identity  # noqa: F401  (registers "identity")
from .base import Codec, available_codecs, get_codec, register_codec, register_stage

__all__ = ["Codec", "available_codecs", "get_codec", "register_codec", "register_stage"]
