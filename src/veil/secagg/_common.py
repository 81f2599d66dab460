"""What the client and server state machines share: the steps, the key labels, and
how a pairwise or self mask is derived and applied."""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from veil.errors import MessageError
from veil.secagg.crypto import agree, derive, expand_mask
from veil.secagg.messages import Message
from veil.secagg.shamir import SHARE_BYTES

__all__ = ["Step"]

M = TypeVar("M", bound=Message)

_PLAIN = struct.Struct(">III")
PLAINTEXT_BYTES = _PLAIN.size + 2 * SHARE_BYTES


class Step(IntEnum):
    """The four steps of a round, in order (Bonawitz et al. 2017, rounds 0-3; the
    consistency check of their malicious-server variant is not implemented)."""

    ADVERTISE_KEYS = 1
    SHARE_KEYS = 2
    MASKED_INPUT = 3
    UNMASKING = 4


def expect(message: Message, kind: type[M], rnd: int, party: int) -> M:
    """``message`` if it is a ``kind`` of round ``rnd`` for or from ``party``."""
    if not isinstance(message, kind):
        raise MessageError(
            f"expected a {kind.__name__} message, got {type(message).__name__}"
        )
    if message.round != rnd:
        raise MessageError(
            f"{kind.__name__} must be for round {rnd}, got round {message.round}"
        )
    got = getattr(message, "sender", getattr(message, "recipient", None))
    if got != party:
        raise MessageError(f"{kind.__name__} must name client {party}, but names {got}")
    return message


def share_key(
    private: X25519PrivateKey, peer: bytes, rnd: int, a: int, b: int
) -> bytes:
    """The AES-GCM key sealing shares between clients ``a`` and ``b``."""
    return agree(private, peer, "share", rnd, min(a, b), max(a, b))


def pair_mask(
    private: X25519PrivateKey | bytes,
    peer: bytes,
    rnd: int,
    a: int,
    b: int,
    length: int,
    bits: int,
) -> np.ndarray:
    """The mask clients ``a`` and ``b`` share (the same from either side)."""
    seed = agree(private, peer, "mask", rnd, min(a, b), max(a, b))
    return expand_mask(seed, length, bits)


def self_mask(seed: bytes, rnd: int, length: int, bits: int) -> np.ndarray:
    """The mask a client adds from its own self-mask seed."""
    return expand_mask(derive(seed, "self-mask", rnd), length, bits)


def pack_shares(sender: int, recipient: int, rnd: int, seed: int, key: int) -> bytes:
    """The plaintext of a sealed share pair."""
    return (
        _PLAIN.pack(sender, recipient, rnd)
        + seed.to_bytes(SHARE_BYTES, "big")
        + key.to_bytes(SHARE_BYTES, "big")
    )


def unpack_shares(
    plain: bytes, sender: int, recipient: int, rnd: int
) -> tuple[int, int]:
    """The (self-mask seed share, mask key share) of a plaintext, after checking it
    names ``sender``, ``recipient`` and ``rnd``."""
    if len(plain) != PLAINTEXT_BYTES:
        raise MessageError(
            f"share plaintext must be {PLAINTEXT_BYTES} bytes, got {len(plain)}"
        )
    if _PLAIN.unpack_from(plain) != (sender, recipient, rnd):
        raise MessageError("share plaintext names another sender, recipient or round")
    seed = int.from_bytes(plain[_PLAIN.size : _PLAIN.size + SHARE_BYTES], "big")
    key = int.from_bytes(plain[_PLAIN.size + SHARE_BYTES :], "big")
    return seed, key


def mask_add(acc: np.ndarray, mask: np.ndarray, sign: int) -> None:
    """``acc += sign * mask`` modulo the width of their (unsigned) type, in place."""
    if sign > 0:
        np.add(acc, mask, out=acc)
    else:
        np.subtract(acc, mask, out=acc)


def reduce_bits(vector: np.ndarray, bits: int) -> np.ndarray:
    """``vector`` modulo ``2**bits``, in place."""
    if bits < 8 * vector.dtype.itemsize:
        vector &= vector.dtype.type(2**bits - 1)
    return vector
