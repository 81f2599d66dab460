"""The cryptographic wrappers: agreement, sealing, mask expansion, commitments."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from veil.errors import MessageError, SecAggError
from veil.secagg import crypto


def test_agreement_is_symmetric_and_bound_to_its_context() -> None:
    a, b = crypto.generate_key(), crypto.generate_key()
    ab = crypto.agree(a, crypto.public_bytes(b), "mask", 3, 1, 2)
    assert ab == crypto.agree(b, crypto.public_bytes(a), "mask", 3, 1, 2)
    assert ab != crypto.agree(a, crypto.public_bytes(b), "mask", 4, 1, 2)
    assert ab != crypto.agree(a, crypto.public_bytes(b), "share", 3, 1, 2)


def test_private_key_bytes_give_the_same_agreement() -> None:
    a, b = crypto.generate_key(), crypto.generate_key()
    raw = crypto.private_bytes(a)
    assert crypto.public_from_private(raw) == crypto.public_bytes(a)
    peer = crypto.public_bytes(b)
    assert crypto.agree(raw, peer, "x") == crypto.agree(a, peer, "x")


def test_low_order_public_key_refused() -> None:
    with pytest.raises(MessageError, match="refused by X25519"):
        crypto.agree(crypto.generate_key(), bytes(32), "x")


def test_sealed_blob_opens_only_unchanged() -> None:
    key = bytes(range(32))
    blob = crypto.seal(key, b"share", b"header")
    assert crypto.open_sealed(key, blob, b"header") == b"share"
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    for k, b, ad in [
        (key, bytes(tampered), b"header"),
        (key, blob, b"other header"),
        (bytes(32), blob, b"header"),
        (key, blob[:20], b"header"),
    ]:
        with pytest.raises(MessageError):
            crypto.open_sealed(k, b, ad)


@pytest.mark.parametrize("bits", [2, 8, 13, 32, 40, 64])
def test_mask_is_deterministic_and_within_bits(bits: int) -> None:
    seed = bytes(range(32))
    mask = crypto.expand_mask(seed, 1000, bits)
    assert np.array_equal(mask, crypto.expand_mask(seed, 1000, bits))
    assert int(mask.max()) < 2**bits
    assert not np.array_equal(mask, crypto.expand_mask(bytes(32), 1000, bits))


def test_mask_is_uniform() -> None:
    mask = crypto.expand_mask(bytes(range(32)), 200_000, 16)
    counts = np.bincount(mask >> 8, minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_mask_seed_length_checked() -> None:
    with pytest.raises(SecAggError, match="seed must be 32 bytes"):
        crypto.expand_mask(b"short", 10, 32)


def test_commitment_binds_the_seed() -> None:
    assert crypto.commit(bytes(32)) == crypto.commit(bytes(32))
    assert crypto.commit(bytes(32)) != crypto.commit(b"\x01" + bytes(31))
