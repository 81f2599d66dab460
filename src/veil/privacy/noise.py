"""Where DP noise comes from: a seeded generator, or the operating system's CSPRNG.

The DP-SGD step (:mod:`veil.privacy.dpsgd`) draws its Gaussian noise from a
:class:`NoiseSource`. Two exist:

- :class:`GeneratorNoise` draws from a ``torch.Generator`` (Mersenne Twister). It is
  fast and makes a run reproducible from its seed, which is what experiments want.
  It is **not** a secure source: anyone who knows the seed (it is in the run's config)
  or who can infer the generator's state from enough outputs can recompute the noise
  and subtract it, which removes the privacy entirely. The first time DP noise is drawn
  from it in a process, a :class:`InsecureNoiseWarning` says so, once.
- :class:`SecureNoise` draws uniform bits from ``os.urandom`` (the kernel's CSPRNG) and
  turns them into Gaussians in float64 with the Box-Muller transform, then rounds to the
  gradient's dtype. It cannot be replayed from a seed, so runs using it are not
  reproducible. Cost: about 8 bytes of kernel randomness and a float64 transform per
  parameter per step; on the models veil ships this is about 6 ms per step for the
  2NN (199,210 parameters; two thirds of it is ``os.urandom``), against about 0.7 ms
  from the seeded generator, and well under a millisecond for the tanh CNN.

What the secure source does *not* protect against: the floating-point attacks on
sampled noise (Mironov 2012: the low-order bits of a float Gaussian sample can reveal
the value it was added to; a fix needs discrete or snapped noise), timing side
channels, a compromised device or server, and leaks outside the noisy release
(reported training losses, data-dependent hyperparameter choices).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Protocol

import numpy as np
import torch

from veil.errors import PrivacyError

__all__ = ["GeneratorNoise", "InsecureNoiseWarning", "NoiseSource", "SecureNoise"]

_warned = False


class InsecureNoiseWarning(UserWarning):
    """DP noise is drawn from a generator that is not cryptographically secure."""


class NoiseSource(Protocol):
    """Draws Gaussian noise for a DP mechanism.

    ``fill_normal`` writes the draw into a buffer the caller already holds (the
    DP-SGD step draws straight into the gradient sums it returns, which saves an
    allocation and a pass over the gradient); ``normal`` returns a new tensor. Both
    draw the same distribution.
    """

    def normal(self, shape: torch.Size, std: float, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` with i.i.d. N(0, ``std``**2) entries."""
        ...

    def fill_normal(self, out: torch.Tensor, std: float) -> torch.Tensor:
        """Overwrite the contiguous tensor ``out`` with i.i.d. N(0, ``std``**2)
        entries (in its dtype) and return it."""
        ...


class GeneratorNoise:
    """Gaussian noise from a seeded ``torch.Generator`` (reproducible, not secure).

    Args:
        generator: the CPU generator to draw from; its state advances.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def normal(self, shape: torch.Size, std: float, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` with i.i.d. N(0, ``std``**2) entries."""
        _warn_once()
        noise = torch.empty(shape, dtype=dtype)
        return noise.normal_(0.0, std, generator=self.generator)

    def fill_normal(self, out: torch.Tensor, std: float) -> torch.Tensor:
        """Overwrite ``out`` with i.i.d. N(0, ``std``**2) entries and return it.

        ``out`` must be contiguous; it then receives exactly the values that
        :meth:`normal` would have returned for its shape and dtype from the same
        generator state.
        """
        _check_contiguous(out)
        _warn_once()
        return out.normal_(0.0, std, generator=self.generator)


class SecureNoise:
    """Gaussian noise from the operating system's CSPRNG (``os.urandom``).

    Not reproducible. See the module docstring for its cost and its limits.
    """

    @staticmethod
    def uniform(n: int) -> np.ndarray:
        """``n`` float64 uniforms in (0, 1] (53 random bits each, never 0)."""
        bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        values = bits.astype(np.float64)
        values += 1.0
        values *= 2.0**-53
        return values

    def normal(self, shape: torch.Size, std: float, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` with i.i.d. N(0, ``std``**2) entries."""
        return self._float64(math.prod(shape), std).to(dtype).reshape(shape)

    def fill_normal(self, out: torch.Tensor, std: float) -> torch.Tensor:
        """Overwrite ``out`` with i.i.d. N(0, ``std``**2) entries and return it."""
        _check_contiguous(out)
        return out.copy_(self._float64(out.numel(), std).view(out.shape))

    def _float64(self, n: int, std: float) -> torch.Tensor:
        """``n`` i.i.d. N(0, ``std``**2) values in float64 (Box-Muller)."""
        pairs = (n + 1) // 2
        uniform = torch.from_numpy(self.uniform(2 * pairs))
        u1, u2 = uniform[:pairs], uniform[pairs:]
        radius = u1.log_().mul_(-2.0).sqrt_().mul_(std)  # u1 > 0: log is finite
        angle = u2.mul_(2.0 * math.pi)
        values = torch.cat([radius * angle.cos(), radius * angle.sin()])
        return values[:n]


def _check_contiguous(out: torch.Tensor) -> None:
    if not out.is_contiguous():
        raise PrivacyError(
            "fill_normal needs a contiguous tensor, got one with shape "
            f"{tuple(out.shape)} and strides {out.stride()}; pass out.contiguous() "
            "or use normal()"
        )


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "DP noise is drawn from a seeded torch.Generator, which is not "
            "cryptographically secure: whoever knows the seed can remove the noise. "
            "Fine for experiments; for deployment pass secure_noise=True.",
            InsecureNoiseWarning,
            stacklevel=3,
        )
