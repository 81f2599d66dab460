"""Fixed-point encoding: refusals, exact sums without wrapping, decoding error."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import SecAggError
from veil.secagg import FixedPoint, dtype_for_bits


@pytest.mark.parametrize("clip_range", [0.0, -1.0, math.inf, math.nan])
def test_range_must_be_positive_and_finite(clip_range: float) -> None:
    with pytest.raises(SecAggError, match="clip_range must be a positive"):
        FixedPoint(clip_range, 32, 10)


def test_modulus_checked_up_front_for_the_number_of_clients() -> None:
    with pytest.raises(SecAggError, match="bits must be at least 11 to add 1000"):
        FixedPoint(1.0, 10, 1000)
    assert FixedPoint(1.0, 11, 1000).levels == 2


@pytest.mark.parametrize("bits", [1, 65])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(SecAggError, match="bits must be in"):
        dtype_for_bits(bits)


def test_dtype_is_the_smallest_that_holds_bits() -> None:
    assert [dtype_for_bits(b).itemsize for b in (8, 9, 16, 17, 32, 33, 64)] == [
        1, 2, 2, 4, 4, 8, 8,
    ]  # fmt: skip


def test_nan_refused() -> None:
    with pytest.raises(SecAggError, match="NaN"):
        FixedPoint(1.0, 32, 2).encode(np.array([0.0, np.nan]))


@given(
    n=st.integers(1, 300),
    bits=st.integers(12, 64),
    clip_range=st.floats(1e-3, 1e3),
)
@settings(max_examples=60, deadline=None)
def test_sum_of_n_extreme_codes_never_wraps(
    n: int, bits: int, clip_range: float
) -> None:
    fp = FixedPoint(clip_range, bits, n)
    top = fp.encode(np.array([clip_range, -clip_range, 0.0]))
    assert int(top[0]) * n < 2**bits
    assert int(top[1]) == 0
    assert fp.decode_sum(np.array([int(top[0]) * n], dtype=np.uint64), n)[0] == (
        pytest.approx(n * clip_range, rel=1e-9)
    )


@given(
    n=st.integers(1, 50),
    bits=st.sampled_from([16, 24, 32, 48, 64]),
    clip_range=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_decoded_sum_within_quantisation_error(
    n: int, bits: int, clip_range: float, seed: int
) -> None:
    fp = FixedPoint(clip_range, bits, n)
    rng = np.random.default_rng(seed)
    values = rng.uniform(-clip_range, clip_range, size=(n, 40))
    codes = sum(fp.encode(v).astype(object) for v in values)
    code_sum = np.array([int(c) % fp.modulus for c in codes], dtype=np.uint64)
    decoded = fp.decode_sum(code_sum, n)
    error = np.abs(decoded - values.sum(axis=0)).max()
    # rounding error, plus float64 error of the affine map
    assert error <= fp.sum_error(n) * (1 + 1e-9) + 1e-12 * n * clip_range


def test_values_beyond_the_range_are_clipped() -> None:
    fp = FixedPoint(1.0, 32, 3)
    codes = fp.encode(np.array([5.0, -5.0]))
    assert list(fp.decode_sum(codes, 1)) == [1.0, -1.0]
