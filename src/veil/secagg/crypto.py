"""The cryptographic building blocks of secure aggregation, all from ``cryptography``.

- Key agreement: X25519 (:func:`generate_key`, :func:`agree`), the shared secret
  passed through HKDF-SHA256 with a label naming its use, the round and the pair of
  clients, so no key is used for two purposes or in two rounds.
- Share relay: AES-256-GCM (:func:`seal`, :func:`open_sealed`) with a random 96-bit
  nonce and the message header as associated data, so a share cannot be moved to
  another sender, recipient or round without failing authentication.
- Masks: the ChaCha20 keystream of a 32-byte seed (:func:`expand_mask`), read as
  little-endian unsigned integers modulo ``2**bits``.
- Commitments: SHA-256 of a self-mask seed (:func:`commit`), published in the
  advertise-keys step so the server can check a reconstructed seed.

Nothing here is a home-made primitive; this module only fixes how they are used.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.errors import MessageError, SecAggError
from veil.secagg.fixedpoint import dtype_for_bits

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "agree",
    "commit",
    "derive",
    "expand_mask",
    "generate_key",
    "open_sealed",
    "private_bytes",
    "public_bytes",
    "public_from_private",
    "seal",
]

#: Length of an X25519 key, a seed, a derived key and a commitment.
KEY_BYTES = 32
#: AES-GCM nonce and tag lengths.
NONCE_BYTES = 12
TAG_BYTES = 16

_RAW = serialization.Encoding.Raw
_LABEL = b"veil-secagg/1/"


def generate_key() -> X25519PrivateKey:
    """A fresh X25519 private key from the operating system's CSPRNG."""
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key (what is secret-shared)."""
    return key.private_bytes(
        _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the key's public key."""
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def public_from_private(raw: bytes) -> bytes:
    """The public key of a raw 32-byte private key."""
    return public_bytes(X25519PrivateKey.from_private_bytes(raw))


def derive(secret: bytes, label: str, *context: int) -> bytes:
    """A 32-byte key from ``secret`` by HKDF-SHA256, bound to ``label`` and the
    integers ``context`` (round, client ids)."""
    info = _LABEL + label.encode() + struct.pack(f">{len(context)}I", *context)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info)
    return hkdf.derive(secret)


def agree(
    private: X25519PrivateKey | bytes, peer_public: bytes, label: str, *context: int
) -> bytes:
    """The key two clients share: X25519 of ``private`` and ``peer_public``, then
    :func:`derive` with ``label`` and ``context``.

    Raises:
        MessageError: ``peer_public`` is not a usable X25519 public key.
    """
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        shared = private.exchange(peer)
    except ValueError as exc:  # wrong length or a low-order point
        raise MessageError(f"public key refused by X25519 ({exc})") from None
    return derive(shared, label, *context)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """``nonce || AES-256-GCM(key, nonce, plaintext, associated)`` with a random
    nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, blob: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`seal` output.

    Raises:
        MessageError: the blob is too short, or was tampered with, or was sealed for
            another key or other associated data.
    """
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise MessageError(
            f"ciphertext must be at least {NONCE_BYTES + TAG_BYTES} bytes, got "
            f"{len(blob)}"
        )
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated)
    except InvalidTag:
        raise MessageError("ciphertext failed authentication") from None


def expand_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` pseudorandom integers uniform modulo ``2**bits`` from a 32-byte
    seed (ChaCha20 keystream, zero nonce: every seed is used for one mask only).

    Returns:
        A 1-D array of :func:`~veil.secagg.fixedpoint.dtype_for_bits` ``(bits)``.
    """
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"seed must be {KEY_BYTES} bytes, got {len(seed)}")
    dtype = dtype_for_bits(bits).newbyteorder("<")
    cipher = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None)
    stream = cipher.encryptor().update(bytes(length * dtype.itemsize))
    mask = np.frombuffer(stream, dtype=dtype).astype(dtype.newbyteorder("="))
    if bits < 8 * dtype.itemsize:
        mask &= mask.dtype.type(2**bits - 1)
    return mask


def commit(seed: bytes) -> bytes:
    """A binding commitment to a 32-byte random seed: SHA-256 with a label."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_LABEL + b"commit")
    digest.update(seed)
    return digest.finalize()
