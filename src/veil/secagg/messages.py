"""The messages of a secure aggregation round, as bytes with one defined layout.

Every message starts with a 13-byte header: the magic ``b"VSA1"``, a kind byte, the
round (uint32) and the party (uint32): the sender of a client message, the recipient
of a server message (:data:`SERVER` for a broadcast). All integers are big-endian;
client lists are sorted and without repeats; vectors are little-endian unsigned
integers of the round's width. :func:`decode` refuses anything else (wrong magic,
unknown kind, truncated or trailing bytes, unsorted lists, oversized fields) with a
:class:`~veil.errors.MessageError`. Nothing is ever unpickled.

Kinds, in the order of a round: :class:`RoundConfig` (server), :class:`AdvertiseKeys`
(client), :class:`KeysBroadcast` (server), :class:`SharedKeys` (client),
:class:`ForwardedShares` (server), :class:`MaskedInput` (client),
:class:`UnmaskRequest` (server), :class:`UnmaskShares` (client).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

import numpy as np

from veil.errors import MessageError
from veil.secagg.crypto import KEY_BYTES
from veil.secagg.fixedpoint import MAX_BITS, MIN_BITS, dtype_for_bits
from veil.secagg.shamir import PRIME, SHARE_BYTES

__all__ = [
    "HEADER_BYTES",
    "MAGIC",
    "SERVER",
    "AdvertiseKeys",
    "ClientKeys",
    "ForwardedShares",
    "KeysBroadcast",
    "Kind",
    "MaskedInput",
    "Message",
    "RoundConfig",
    "SecretKind",
    "SharedKeys",
    "UnmaskRequest",
    "UnmaskShares",
    "decode",
    "share_associated_data",
]

MAGIC = b"VSA1"
HEADER_BYTES = 13
#: The party field of a server broadcast.
SERVER = 0xFFFFFFFF
_HEADER = struct.Struct(">4sBII")
_MAX_BLOB = 1 << 16  # a sealed share is about 110 bytes


class Kind(IntEnum):
    """The kind byte of a message."""

    ROUND_CONFIG = 1
    ADVERTISE_KEYS = 2
    KEYS_BROADCAST = 3
    SHARED_KEYS = 4
    FORWARDED_SHARES = 5
    MASKED_INPUT = 6
    UNMASK_REQUEST = 7
    UNMASK_SHARES = 8
    SHARE_PLAINTEXT = 9  # only inside a sealed share, never sent in the clear


class SecretKind(IntEnum):
    """Which of a client's two secrets a revealed share belongs to."""

    SELF_MASK_SEED = 0
    MASK_KEY = 1


class _Writer:
    def __init__(self, kind: Kind, rnd: int, party: int) -> None:
        self.parts = [_HEADER.pack(MAGIC, kind, rnd, party)]

    def u8(self, v: int) -> _Writer:
        self.parts.append(struct.pack(">B", v))
        return self

    def u32(self, v: int) -> _Writer:
        self.parts.append(struct.pack(">I", v))
        return self

    def raw(self, b: bytes) -> _Writer:
        self.parts.append(b)
        return self

    def blob(self, b: bytes) -> _Writer:
        return self.u32(len(b)).raw(b)

    def ids(self, ids: tuple[int, ...]) -> _Writer:
        self.u32(len(ids))
        self.parts.append(struct.pack(f">{len(ids)}I", *ids))
        return self

    def done(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes, offset: int) -> None:
        self.data, self.pos = data, offset

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MessageError(
                f"message is truncated: needs {n} more bytes at offset {self.pos}, "
                f"has {len(self.data) - self.pos}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def count(self, item_bytes: int) -> int:
        n = self.u32()
        if n * item_bytes > len(self.data) - self.pos:
            raise MessageError(f"message is truncated: announces {n} items")
        return n

    def blob(self) -> bytes:
        n = self.u32()
        if n > _MAX_BLOB:
            raise MessageError(f"a ciphertext must be <= {_MAX_BLOB} bytes, got {n}")
        return self.take(n)

    def ids(self) -> tuple[int, ...]:
        n = self.count(4)
        return _sorted_ids(struct.unpack(f">{n}I", self.take(4 * n)), "client list")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise MessageError(
                f"message has {len(self.data) - self.pos} trailing bytes"
            )


def _sorted_ids(ids: tuple[int, ...] | list[int], what: str) -> tuple[int, ...]:
    out = tuple(int(i) for i in ids)
    if any(a >= b for a, b in itertools.pairwise(out)):
        raise MessageError(f"{what} must be sorted and without repeats")
    return out


@dataclass(frozen=True)
class RoundConfig:
    """Server broadcast opening a round: the parameters every client checks.

    Attributes:
        round: the round number.
        bits: width b of the modulus ``2**b``.
        length: number of elements of every input vector.
        threshold: t, shares needed to reconstruct one client's secret.
        neighbours: k, neighbours per client (SecAgg+); 0 for every other client
            (the full graph of Bonawitz et al.).
        graph_seed: 32 public random bytes fixing the neighbour graph.
        clients: the invited clients, sorted.
    """

    round: int
    bits: int
    length: int
    threshold: int
    neighbours: int
    graph_seed: bytes
    clients: tuple[int, ...]

    def encode(self) -> bytes:
        w = _Writer(Kind.ROUND_CONFIG, self.round, SERVER).u8(self.bits)
        w.u32(self.length).u32(self.threshold).u32(self.neighbours)
        return w.raw(self.graph_seed).ids(self.clients).done()


@dataclass(frozen=True)
class AdvertiseKeys:
    """Client to server: two X25519 public keys (one to encrypt shares, one for
    masks) and a commitment to the self-mask seed."""

    round: int
    sender: int
    encryption_key: bytes
    mask_key: bytes
    seed_commitment: bytes

    def encode(self) -> bytes:
        w = _Writer(Kind.ADVERTISE_KEYS, self.round, self.sender)
        w.raw(self.encryption_key).raw(self.mask_key).raw(self.seed_commitment)
        return w.done()


@dataclass(frozen=True)
class ClientKeys:
    """One client's advertised keys, as broadcast by the server."""

    client: int
    encryption_key: bytes
    mask_key: bytes
    seed_commitment: bytes


@dataclass(frozen=True)
class KeysBroadcast:
    """Server to one client: the advertised keys of it and its neighbours."""

    round: int
    recipient: int
    keys: tuple[ClientKeys, ...]

    def encode(self) -> bytes:
        w = _Writer(Kind.KEYS_BROADCAST, self.round, self.recipient)
        w.u32(len(self.keys))
        for k in self.keys:
            w.u32(k.client).raw(k.encryption_key).raw(k.mask_key)
            w.raw(k.seed_commitment)
        return w.done()


@dataclass(frozen=True)
class SharedKeys:
    """Client to server: one sealed share pair per neighbour, by recipient."""

    round: int
    sender: int
    ciphertexts: tuple[tuple[int, bytes], ...]

    def encode(self) -> bytes:
        w = _Writer(Kind.SHARED_KEYS, self.round, self.sender).u32(
            len(self.ciphertexts)
        )
        for recipient, blob in self.ciphertexts:
            w.u32(recipient).blob(blob)
        return w.done()


@dataclass(frozen=True)
class ForwardedShares:
    """Server to one client: the sealed shares addressed to it, by sender."""

    round: int
    recipient: int
    ciphertexts: tuple[tuple[int, bytes], ...]

    def encode(self) -> bytes:
        w = _Writer(Kind.FORWARDED_SHARES, self.round, self.recipient).u32(
            len(self.ciphertexts)
        )
        for sender, blob in self.ciphertexts:
            w.u32(sender).blob(blob)
        return w.done()


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Client to server: the masked vector, and the neighbours whose sealed shares
    failed authentication (``complaints``)."""

    round: int
    sender: int
    complaints: tuple[int, ...]
    bits: int
    vector: np.ndarray

    def encode(self) -> bytes:
        dtype = dtype_for_bits(self.bits).newbyteorder("<")
        w = _Writer(Kind.MASKED_INPUT, self.round, self.sender).ids(self.complaints)
        w.u8(self.bits).u32(len(self.vector))
        return w.raw(np.ascontiguousarray(self.vector, dtype=dtype).tobytes()).done()


@dataclass(frozen=True)
class UnmaskRequest:
    """Server to one client: which of its neighbours' inputs are in the sum
    (``survivors``) and which neighbours dropped after sharing keys (``dropped``)."""

    round: int
    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def encode(self) -> bytes:
        w = _Writer(Kind.UNMASK_REQUEST, self.round, self.recipient)
        return w.ids(self.survivors).ids(self.dropped).done()


@dataclass(frozen=True)
class UnmaskShares:
    """Client to server: revealed shares ``(client, secret kind, share value)``,
    sorted by client, at most one per client."""

    round: int
    sender: int
    shares: tuple[tuple[int, SecretKind, int], ...]

    def encode(self) -> bytes:
        w = _Writer(Kind.UNMASK_SHARES, self.round, self.sender).u32(len(self.shares))
        for client, kind, value in self.shares:
            w.u32(client).u8(kind).raw(value.to_bytes(SHARE_BYTES, "big"))
        return w.done()


Message: TypeAlias = (
    RoundConfig
    | AdvertiseKeys
    | KeysBroadcast
    | SharedKeys
    | ForwardedShares
    | MaskedInput
    | UnmaskRequest
    | UnmaskShares
)


def share_associated_data(rnd: int, sender: int, recipient: int) -> bytes:
    """What a sealed share is bound to: kind, round, sender and recipient."""
    return _HEADER.pack(MAGIC, Kind.SHARE_PLAINTEXT, rnd, sender) + struct.pack(
        ">I", recipient
    )


def decode(data: bytes) -> Message:
    """The message in ``data``; a :class:`MessageError` for anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageError(f"a message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER_BYTES:
        raise MessageError(
            f"message must be at least {HEADER_BYTES} bytes, got {len(data)}"
        )
    magic, kind, rnd, party = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MessageError(f"message must start with {MAGIC!r}, got {magic!r}")
    try:
        parser = _PARSERS[Kind(kind)]
    except (ValueError, KeyError):
        raise MessageError(f"unknown message kind {kind}") from None
    r = _Reader(data, HEADER_BYTES)
    message = parser(r, rnd, party)
    r.end()
    return message


def _round_config(r: _Reader, rnd: int, party: int) -> RoundConfig:
    if party != SERVER:
        raise MessageError(
            f"a round config is a broadcast (party {SERVER}), got {party}"
        )
    bits = r.u8()
    if not MIN_BITS <= bits <= MAX_BITS:
        raise MessageError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    length, threshold, neighbours = r.u32(), r.u32(), r.u32()
    seed = r.take(KEY_BYTES)
    return RoundConfig(rnd, bits, length, threshold, neighbours, seed, r.ids())


def _advertise(r: _Reader, rnd: int, party: int) -> AdvertiseKeys:
    keys = [r.take(KEY_BYTES) for _ in range(3)]
    return AdvertiseKeys(rnd, party, *keys)


def _broadcast(r: _Reader, rnd: int, party: int) -> KeysBroadcast:
    n = r.count(4 + 3 * KEY_BYTES)
    keys = tuple(
        ClientKeys(r.u32(), r.take(KEY_BYTES), r.take(KEY_BYTES), r.take(KEY_BYTES))
        for _ in range(n)
    )
    _sorted_ids([k.client for k in keys], "client list")
    return KeysBroadcast(rnd, party, keys)


def _pairs(r: _Reader) -> tuple[tuple[int, bytes], ...]:
    n = r.count(8)
    pairs = tuple((r.u32(), r.blob()) for _ in range(n))
    _sorted_ids([p[0] for p in pairs], "client list")
    return pairs


def _shared(r: _Reader, rnd: int, party: int) -> SharedKeys:
    return SharedKeys(rnd, party, _pairs(r))


def _forwarded(r: _Reader, rnd: int, party: int) -> ForwardedShares:
    return ForwardedShares(rnd, party, _pairs(r))


def _masked(r: _Reader, rnd: int, party: int) -> MaskedInput:
    complaints, bits = r.ids(), r.u8()
    dtype = dtype_for_bits(bits) if MIN_BITS <= bits <= MAX_BITS else None
    if dtype is None:
        raise MessageError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    n = r.count(dtype.itemsize)
    raw = r.take(n * dtype.itemsize)
    vector = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
    return MaskedInput(rnd, party, complaints, bits, vector)


def _request(r: _Reader, rnd: int, party: int) -> UnmaskRequest:
    return UnmaskRequest(rnd, party, r.ids(), r.ids())


def _unmask(r: _Reader, rnd: int, party: int) -> UnmaskShares:
    n = r.count(5 + SHARE_BYTES)
    shares = []
    for _ in range(n):
        client, kind = r.u32(), r.u8()
        if kind not in {k.value for k in SecretKind}:
            raise MessageError(f"unknown secret kind {kind}")
        value = int.from_bytes(r.take(SHARE_BYTES), "big")
        if value >= PRIME:
            raise MessageError("a share value is outside the field")
        shares.append((client, SecretKind(kind), value))
    _sorted_ids([s[0] for s in shares], "client list")
    return UnmaskShares(rnd, party, tuple(shares))


_PARSERS: dict[Kind, Callable[[_Reader, int, int], Message]] = {
    Kind.ROUND_CONFIG: _round_config,
    Kind.ADVERTISE_KEYS: _advertise,
    Kind.KEYS_BROADCAST: _broadcast,
    Kind.SHARED_KEYS: _shared,
    Kind.FORWARDED_SHARES: _forwarded,
    Kind.MASKED_INPUT: _masked,
    Kind.UNMASK_REQUEST: _request,
    Kind.UNMASK_SHARES: _unmask,
}
