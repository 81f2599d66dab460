"""The wire format: every message round-trips; anything malformed is a MessageError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import MessageError
from veil.secagg.messages import (
    AdvertiseKeys,
    ClientKeys,
    ForwardedShares,
    KeysBroadcast,
    MaskedInput,
    RoundConfig,
    SecretKind,
    SharedKeys,
    UnmaskRequest,
    UnmaskShares,
    decode,
)

K = bytes(range(32))
EXAMPLES = [
    RoundConfig(7, 32, 100, 3, 4, K, (0, 2, 5)),
    AdvertiseKeys(7, 2, K, K[::-1], bytes(32)),
    KeysBroadcast(7, 2, (ClientKeys(0, K, K, K), ClientKeys(2, K, K, K))),
    SharedKeys(7, 2, ((0, b"abc"), (5, b""))),
    ForwardedShares(7, 0, ((2, b"x" * 110),)),
    UnmaskRequest(7, 0, (0, 2), (5,)),
    UnmaskShares(
        7, 0, ((0, SecretKind.SELF_MASK_SEED, 12), (5, SecretKind.MASK_KEY, 1))
    ),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    data = message.encode()  # type: ignore[attr-defined]
    assert decode(data) == message
    for cut in (1, len(data) // 2, len(data) - 1):
        if cut < len(data):
            with pytest.raises(MessageError):
                decode(data[:cut])
    with pytest.raises(MessageError, match="trailing"):
        decode(data + b"\0")


@pytest.mark.parametrize("bits", [8, 20, 32, 64])
def test_masked_input_round_trip(bits: int) -> None:
    from veil.secagg.fixedpoint import dtype_for_bits

    vector = np.arange(10, dtype=dtype_for_bits(bits)) * 7
    message = MaskedInput(1, 3, (4,), bits, vector)
    back = decode(message.encode())
    assert isinstance(back, MaskedInput)
    assert back.vector.dtype == vector.dtype
    assert np.array_equal(back.vector, vector)
    assert (back.round, back.sender, back.complaints, back.bits) == (1, 3, (4,), bits)


def test_header_refusals() -> None:
    data = EXAMPLES[1].encode()
    with pytest.raises(MessageError, match="must start with"):
        decode(b"XXXX" + data[4:])
    with pytest.raises(MessageError, match="unknown message kind"):
        decode(data[:4] + b"\x63" + data[5:])
    with pytest.raises(MessageError, match="at least 13 bytes"):
        decode(b"VSA1")


def test_unsorted_or_repeated_ids_refused() -> None:
    for ids in ((2, 1), (1, 1)):
        with pytest.raises(MessageError, match="sorted and without repeats"):
            decode(UnmaskRequest(1, 0, ids, ()).encode())


def test_share_outside_the_field_refused() -> None:
    data = bytearray(UnmaskShares(1, 0, ((0, SecretKind.MASK_KEY, 1),)).encode())
    data[-33:] = b"\xff" * 33
    with pytest.raises(MessageError, match="outside the field"):
        decode(bytes(data))


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_random_bytes_only_ever_raise_message_error(data: bytes) -> None:
    try:
        message = decode(data)
    except MessageError:
        return
    assert message.encode() == data  # whatever is accepted has one encoding


@given(st.sampled_from(EXAMPLES), st.integers(0, 10_000), st.integers(0, 255))
@settings(max_examples=300, deadline=None)
def test_flipped_byte_is_refused_or_decodes_cleanly(
    message: object, position: int, value: int
) -> None:
    data = bytearray(message.encode())  # type: ignore[attr-defined]
    data[position % len(data)] = value
    try:
        decoded = decode(bytes(data))
    except MessageError:
        return
    assert decoded.encode() == bytes(data)  # whatever is accepted has one encoding
