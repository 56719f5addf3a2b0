"""Encryption at rest for the tiers whose bytes leave the process (disk, Redis): AES-256-GCM.

``FrameCipher.seal(key, frame)`` encrypts a whole frame (header, codec meta and payload) under a
fresh 96-bit random nonce, authenticated together with the block's key::

    sealed = b"KVTE1" | nonce (12 bytes) | AES-256-GCM(frame, aad = b"KVTE1" | block key) (frame + 16-byte tag)

so a reader of the disk files or the Redis values learns nothing but their sizes, and anything
changed — a flipped bit, a truncated value, a plaintext frame written by someone without the key,
or a sealed frame moved under another block's key — fails ``open`` with ``FrameError``, which the
tiers treat like a checksum failure: a miss, deleted and counted in ``corrupt``. A random nonce per
seal is safe for far more blocks than a cache ever writes under one key (2**32 seals keep the
collision probability under 2**-32).
"""

from __future__ import annotations

import os

from .frames import FrameError

MAGIC = b"KVTE1"
_NONCE = 12
_TAG = 16
OVERHEAD = len(MAGIC) + _NONCE + _TAG  # bytes a sealed frame adds


class FrameCipher:
    """AES-256-GCM sealing of frames bound to their block key (see the module docstring)."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
            raise ValueError(
                f"the encryption key must be 32 bytes (AES-256), got {len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__}"
            )
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(bytes(key))

    def seal(self, key: bytes, frame) -> bytes:
        nonce = os.urandom(_NONCE)
        return MAGIC + nonce + self._aead.encrypt(nonce, bytes(frame), MAGIC + bytes(key))

    def open(self, key: bytes, sealed) -> bytes:
        """The frame sealed under ``key``; ``FrameError`` for anything else."""
        from cryptography.exceptions import InvalidTag

        view = memoryview(sealed).cast("B")
        if view.nbytes < OVERHEAD or view[: len(MAGIC)] != MAGIC:
            raise FrameError("not an encrypted frame (encryption at rest is on: plaintext frames are refused)")
        nonce = bytes(view[len(MAGIC) : len(MAGIC) + _NONCE])
        try:
            return self._aead.decrypt(nonce, view[len(MAGIC) + _NONCE :], MAGIC + bytes(key))
        except InvalidTag:
            raise FrameError("the encrypted frame does not authenticate (tampered, truncated, or another block's)") from None
