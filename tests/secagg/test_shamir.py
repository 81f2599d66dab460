"""Shamir sharing: any t shares reconstruct, fewer reveal nothing about the secret."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from veil.errors import SecAggError
from veil.secagg.shamir import PRIME, holder_x, interpolate, reconstruct, split


def _is_probable_prime(n: int, rounds: int = 40) -> bool:
    rng = np.random.default_rng(0)
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        a = int(rng.integers(2, 2**62)) % (n - 3) + 2
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_prime_and_holds_every_secret() -> None:
    assert _is_probable_prime(PRIME)
    assert PRIME > 2**256


@given(
    holders=st.lists(st.integers(0, 10_000), min_size=1, max_size=25, unique=True),
    data=st.data(),
)
@settings(max_examples=50, deadline=None)
def test_any_threshold_shares_reconstruct(
    holders: list[int], data: st.DataObject
) -> None:
    t = data.draw(st.integers(1, len(holders)))
    secret = os.urandom(32)
    shares = split(secret, holders, t)
    chosen = data.draw(st.permutations(holders))[
        : data.draw(st.integers(t, len(holders)))
    ]
    assert reconstruct({h: shares[h] for h in chosen}, t) == secret


def test_fewer_than_threshold_shares_refused() -> None:
    shares = split(os.urandom(32), [1, 2, 3, 4], 3)
    with pytest.raises(SecAggError, match="need at least threshold=3"):
        reconstruct({1: shares[1], 2: shares[2]}, 3)


@given(t=st.integers(2, 8), seed=st.integers(0, 2**31))
@settings(max_examples=30, deadline=None)
def test_fewer_than_threshold_shares_fit_every_secret(t: int, seed: int) -> None:
    """t - 1 shares are consistent with any secret: for each candidate there is a
    polynomial of degree t - 1 through them and (0, candidate)."""
    holders = list(range(t + 3))
    secret = os.urandom(32)
    shares = split(secret, holders, t)
    seen = {holder_x(h): shares[h] for h in holders[: t - 1]}
    rng = np.random.default_rng(seed)
    candidate = int.from_bytes(rng.bytes(32), "big")
    points = {0: candidate, **seen}
    # The polynomial through them gives a full set of shares of the candidate.
    forged = {h: interpolate(points, holder_x(h)) for h in holders}
    assert all(forged[h] == shares[h] for h in holders[: t - 1])
    assert reconstruct(forged, t) == candidate.to_bytes(32, "big")


def test_one_share_is_uniform_whatever_the_secret() -> None:
    """Chi-square on the top byte of one share (t = 2), secret all-zero vs all-ones:
    both follow the uniform law on the field."""
    for secret in (bytes(32), b"\xff" * 32):
        top = [split(secret, [0, 1], 2)[0] >> 249 for _ in range(4000)]
        counts = np.bincount(top, minlength=128)  # values < PRIME >> 249 = 128
        assert stats.chisquare(counts).pvalue > 1e-4


def test_shares_outside_the_field_refused() -> None:
    with pytest.raises(SecAggError, match="outside the field"):
        reconstruct({0: PRIME, 1: 1}, 2)


def test_bad_arguments_refused() -> None:
    with pytest.raises(SecAggError, match="32 bytes"):
        split(b"short", [0, 1], 1)
    with pytest.raises(SecAggError, match="threshold must be in"):
        split(bytes(32), [0, 1], 3)
    with pytest.raises(SecAggError, match="distinct"):
        split(bytes(32), [0, 0], 1)
