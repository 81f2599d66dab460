"""Shamir secret sharing of 32-byte secrets over the prime field GF(2**256 + 297).

In the share-keys step each client splits two secrets, its self-mask seed and its
mask private key, into one share per holder (itself and its neighbours); any
``threshold`` shares give the secret back, fewer give no information about it. A
share is a point ``(x, f(x))`` of a random polynomial ``f`` of degree
``threshold - 1`` with ``f(0) = secret``; the holder with client id ``i`` gets
``x = i + 1`` (never 0). Coefficients come from the operating system's CSPRNG.

This is protocol arithmetic, not a cipher: the confidentiality of shares in transit
comes from authenticated encryption (:mod:`veil.secagg.crypto`).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Mapping, Sequence

from veil.errors import SecAggError

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "holder_x",
    "interpolate",
    "reconstruct",
    "split",
]

#: The field's prime, the smallest above 2**256 (so every 32-byte secret fits).
PRIME = 2**256 + 297
#: Length of a secret.
SECRET_BYTES = 32
#: Length of one share value on the wire (a field element, big-endian).
SHARE_BYTES = 33


def holder_x(client_id: int) -> int:
    """The x-coordinate of the share held by ``client_id`` (>= 0): ``client_id + 1``."""
    if client_id < 0:
        raise SecAggError(f"client_id must be >= 0, got {client_id}")
    return client_id + 1


def split(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` for ``holders`` (client ids), any ``threshold`` of which
    reconstruct it.

    Args:
        secret: exactly :data:`SECRET_BYTES` bytes.
        holders: distinct client ids, at least ``threshold`` of them.
        threshold: shares needed to reconstruct, in ``[1, len(holders)]``.

    Returns:
        The share value of each holder, by client id.
    """
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(holders)) != len(holders):
        raise SecAggError("holders must be distinct client ids")
    if not 1 <= threshold <= len(holders):
        raise SecAggError(
            f"threshold must be in [1, {len(holders)}] (the number of holders), "
            f"got {threshold}"
        )
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for holder in holders:
        x = holder_x(holder)
        y = 0
        for c in reversed(coefficients):  # Horner's rule
            y = (y * x + c) % PRIME
        shares[holder] = y
    return shares


@functools.lru_cache(maxsize=4096)
def _lagrange(xs: tuple[int, ...], at: int) -> tuple[int, ...]:
    """Coefficients ``l_i`` with ``f(at) = sum_i l_i f(xs[i])`` for any polynomial of
    degree < len(xs)."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def interpolate(points: Mapping[int, int], at: int = 0) -> int:
    """The value at ``at`` of the polynomial through ``points`` (x -> y, distinct
    x-coordinates), of degree < len(points)."""
    xs = tuple(sorted(points))
    coefficients = _lagrange(xs, at % PRIME)
    return sum(c * points[x] for c, x in zip(coefficients, xs, strict=True)) % PRIME


def reconstruct(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (client id -> share value).

    The ``threshold`` shares of the smallest client ids are used. Shares that are not
    of one polynomial give a wrong secret or, when the value does not fit in 32 bytes,
    a :class:`SecAggError`; callers verify the secret against a commitment.

    Raises:
        SecAggError: fewer than ``threshold`` shares, or a share outside the field.
    """
    if threshold < 1 or len(shares) < threshold:
        raise SecAggError(
            f"need at least threshold={threshold} shares to reconstruct, got "
            f"{len(shares)}"
        )
    for holder, value in shares.items():
        if not 0 <= value < PRIME:
            raise SecAggError(f"share of client {holder} is outside the field")
    chosen = sorted(shares)[:threshold]
    value = interpolate({holder_x(h): shares[h] for h in chosen})
    if value >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("shares are inconsistent: the secret does not fit 32 bytes")
    return value.to_bytes(SECRET_BYTES, "big")
