"""Malformed, forged, tampered and replayed messages: the sender is dropped, the round
goes on, and the sum of the others is exact."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from veil.secagg import SecAggServer, Step, secure_sum
from veil.secagg.messages import SharedKeys, UnmaskShares, decode

N, LENGTH, BITS = 8, 6, 32
BAD = 3


def _inputs() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        c: rng.integers(0, 2**32, LENGTH, dtype=np.uint64).astype(np.uint32)
        for c in range(N)
    }


def _expected(inputs: dict[int, np.ndarray], clients: tuple[int, ...]) -> np.ndarray:
    return (sum(inputs[c].astype(np.uint64) for c in clients) % 2**BITS).astype(
        np.uint32
    )


def _run(intercept, **kwargs):  # type: ignore[no-untyped-def]
    inputs = _inputs()
    result = secure_sum(inputs, BITS, round=2, intercept=intercept, **kwargs)
    assert np.array_equal(result.total, _expected(inputs, result.included))
    return result


def _at(step: Step, change):  # type: ignore[no-untyped-def]
    def intercept(s: Step, sender: int, data: bytes) -> list[tuple[int, bytes]]:
        if s == step and sender == BAD:
            return change(sender, data)
        return [(sender, data)]

    return intercept


@pytest.mark.parametrize("step", list(Step))
def test_truncated_message_drops_its_sender(step: Step) -> None:
    result = _run(_at(step, lambda s, d: [(s, d[:-1])]))
    assert "truncated" in result.dropped[BAD] or "trailing" in result.dropped[BAD]
    assert (BAD in result.included) == (step == Step.UNMASKING)
    assert len(result.dropped) == 1


@pytest.mark.parametrize("step", list(Step))
def test_message_forged_in_another_clients_name_drops_the_forger(step: Step) -> None:
    def forge(sender: int, data: bytes) -> list[tuple[int, bytes]]:
        return [(sender, data[:9] + struct.pack(">I", 5) + data[13:])]

    result = _run(_at(step, forge))
    assert "names sender 5 but came from 3" in result.dropped[BAD]
    assert 5 not in result.dropped


@pytest.mark.parametrize("step", list(Step))
def test_replayed_message_in_one_step_drops_its_sender(step: Step) -> None:
    result = _run(_at(step, lambda s, d: [(s, d), (s, d)]))
    assert "replay" in result.dropped[BAD]


@pytest.mark.parametrize("step", list(Step))
def test_message_from_another_round_is_refused(step: Step) -> None:
    def other_round(sender: int, data: bytes) -> list[tuple[int, bytes]]:
        return [(sender, data[:5] + struct.pack(">I", 1) + data[9:])]

    result = _run(_at(step, other_round))
    assert "round 1, not 2" in result.dropped[BAD]


def test_message_recorded_in_an_earlier_round_is_refused() -> None:
    recorded: dict[Step, bytes] = {}

    def record(step: Step, sender: int, data: bytes) -> list[tuple[int, bytes]]:
        if sender == BAD:
            recorded[step] = data
        return [(sender, data)]

    secure_sum(_inputs(), BITS, round=1, intercept=record)
    for step in Step:
        result = _run(_at(step, lambda s, d, st=step: [(s, recorded[st])]))
        assert BAD in result.dropped


def test_tampered_share_ciphertext_drops_its_sender() -> None:
    def tamper(sender: int, data: bytes) -> list[tuple[int, bytes]]:
        message = decode(data)
        assert isinstance(message, SharedKeys)
        (first, blob), *rest = message.ciphertexts
        flipped = blob[:-1] + bytes([blob[-1] ^ 1])
        return [
            (
                sender,
                SharedKeys(message.round, sender, ((first, flipped), *rest)).encode(),
            )
        ]

    result = _run(_at(Step.SHARE_KEYS, tamper))
    assert "could not open its shares" in result.dropped[BAD]
    assert BAD not in result.included


def test_share_moved_to_another_recipient_is_refused() -> None:
    def swap(sender: int, data: bytes) -> list[tuple[int, bytes]]:
        message = decode(data)
        assert isinstance(message, SharedKeys)
        (a, blob_a), (b, blob_b), *rest = message.ciphertexts
        return [
            (
                sender,
                SharedKeys(
                    message.round, sender, ((a, blob_b), (b, blob_a), *rest)
                ).encode(),
            )
        ]

    result = _run(_at(Step.SHARE_KEYS, swap))
    assert BAD in result.dropped and BAD not in result.included


def test_another_clients_keys_replayed_drops_both() -> None:
    keys: dict[int, bytes] = {}

    def copy_keys(step: Step, sender: int, data: bytes) -> list[tuple[int, bytes]]:
        if step == Step.ADVERTISE_KEYS:
            keys[sender] = data
            if sender == BAD:
                return [(sender, data[:9] + struct.pack(">I", BAD) + keys[1][13:])]
        return [(sender, data)]

    result = _run(copy_keys)
    assert "advertised twice" in result.dropped[BAD]
    assert "advertised twice" in result.dropped[1]


def test_wrong_share_while_unmasking_is_caught_and_the_sum_stays_exact() -> None:
    def lie(sender: int, data: bytes) -> list[tuple[int, bytes]]:
        message = decode(data)
        assert isinstance(message, UnmaskShares)
        shares = tuple((c, k, (v + 1) % 2**256) for c, k, v in message.shares)
        return [(sender, UnmaskShares(message.round, sender, shares).encode())]

    # BAD = 3 is among the first t = 5 holders: the first try fails its check
    result = _run(_at(Step.UNMASKING, lie))
    assert "wrong share" in result.dropped[BAD]
    assert BAD in result.included  # its input was accepted before it lied
    assert list(result.dropped) == [BAD]


def test_masked_input_of_the_wrong_size_drops_its_sender() -> None:
    def resize(sender: int, data: bytes) -> list[tuple[int, bytes]]:
        message = decode(data)
        from veil.secagg.messages import MaskedInput

        assert isinstance(message, MaskedInput)
        short = MaskedInput(message.round, sender, (), BITS, message.vector[:-1])
        return [(sender, short.encode())]

    result = _run(_at(Step.MASKED_INPUT, resize))
    assert "must be 6 elements" in result.dropped[BAD]


def test_uninvited_sender_is_ignored() -> None:
    server = SecAggServer(0, range(3), 2, 16, threshold=2)
    assert server.receive(99, b"anything") is False
    assert 99 not in server.dropped
