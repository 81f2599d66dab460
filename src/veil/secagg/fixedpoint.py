"""Fixed-point encoding: real vectors to integers modulo ``2**bits`` and back.

Secure aggregation adds integers modulo ``2**bits`` (masks are uniform there), so a
client's clipped update is first encoded as integers. Each value is clipped to
``[-clip_range, clip_range]`` and mapped to one of ``levels + 1`` codes
``0..levels``; ``levels`` is chosen so that the sum of ``num_clients`` codes is at most
``2**bits - 1`` and never wraps. The server decodes the sum of ``count`` clients as
``code_sum * step - count * clip_range``.

Rounding is to the nearest code, so one value is off by at most ``step / 2`` and a sum
of ``count`` values by at most ``count * step / 2`` (:meth:`FixedPoint.sum_error`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from veil.errors import SecAggError

__all__ = ["MAX_BITS", "MIN_BITS", "FixedPoint", "dtype_for_bits"]

#: Widths of the modulus ``2**bits`` that veil accepts.
MIN_BITS = 2
MAX_BITS = 64

# Codes are computed in float64, exact up to 2**53.
_MAX_LEVELS = 2**53


def dtype_for_bits(bits: int) -> np.dtype[np.unsignedinteger]:
    """The smallest unsigned NumPy integer type holding ``bits`` bits: the width of
    one element on the wire."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise SecAggError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    for width, dtype in ((8, np.uint8), (16, np.uint16), (32, np.uint32)):
        if bits <= width:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@dataclass(frozen=True)
class FixedPoint:
    """Encodes values in ``[-clip_range, clip_range]`` as integers modulo ``2**bits``.

    Args:
        clip_range: largest absolute value encoded, > 0 (same unit as the values);
            larger values are clipped to it.
        bits: width b of the modulus ``2**b``, in [2, 64].
        num_clients: largest number of clients whose codes are added, >= 1.

    Raises:
        SecAggError: ``clip_range`` is not a positive finite number, or ``bits`` is too
            small to hold the sum of ``num_clients`` codes with at least 2 levels each.
    """

    clip_range: float
    bits: int
    num_clients: int
    levels: int = field(init=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise SecAggError(
                f"clip_range must be a positive finite number, got {self.clip_range}"
            )
        if self.num_clients < 1:
            raise SecAggError(f"num_clients must be >= 1, got {self.num_clients}")
        dtype_for_bits(self.bits)
        levels = (2**self.bits - 1) // self.num_clients
        if levels < 2:
            need = math.ceil(math.log2(2 * self.num_clients + 1))
            raise SecAggError(
                f"bits must be at least {need} to add {self.num_clients} clients "
                f"without wrapping, got {self.bits}"
            )
        object.__setattr__(self, "levels", min(levels, _MAX_LEVELS))

    @property
    def modulus(self) -> int:
        """``2**bits``."""
        return int(2**self.bits)

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        """NumPy type of one encoded element."""
        return dtype_for_bits(self.bits)

    @property
    def step(self) -> float:
        """Distance between two neighbouring codes, in the values' unit."""
        return 2 * self.clip_range / self.levels

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Codes of ``values`` (any shape, flattened): clipped, rounded to the nearest
        level; a 1-D array of :attr:`dtype`. NaN is refused."""
        x = np.asarray(values, dtype=np.float64).ravel()
        if np.isnan(x).any():
            raise SecAggError("values to encode must not hold NaN")
        x = np.clip(x, -self.clip_range, self.clip_range)
        codes = np.rint((x + self.clip_range) / self.step)
        return np.clip(codes, 0, self.levels).astype(self.dtype)

    def decode_sum(self, code_sum: np.ndarray, count: int) -> np.ndarray:
        """The float64 sum of ``count`` clients' values from the sum of their codes.

        Args:
            code_sum: sum of ``count`` clients' codes (modulo ``2**bits``).
            count: number of clients in the sum, in ``[0, num_clients]``.
        """
        if not 0 <= count <= self.num_clients:
            raise SecAggError(f"count must be in [0, {self.num_clients}], got {count}")
        total = np.asarray(code_sum).astype(np.float64)
        return total * self.step - count * self.clip_range

    def sum_error(self, count: int) -> float:
        """Largest absolute error of one element of :meth:`decode_sum` for ``count``
        clients whose values were within the clip range."""
        return count * self.step / 2
