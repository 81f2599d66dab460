"""Device-side perturbation of a representation (ARDEN, Wang et al. KDD 2018).

In the private-inference data flow this is the step between the device part of a
model and the network: ``x -> device part -> r -> bound -> nullify -> + Laplace -> r~``,
and only ``r~`` leaves the phone.

The mechanism, for one input ``x`` whose representation ``r = f(x)`` has ``d``
elements (each example is flattened):

1. **Bound**: scale to the norm bound: ``r' = r * B' / ||r||_1`` with
   ``B' = B (1 - 1e-6)`` (``r' = 0`` if ``r = 0``), so ``||r'||_1 <= B`` (``B`` is the
   norm ``bound``; the relative margin 1e-6 keeps float32 rounding from pushing a
   result over ``B``). Computed in float64. Scaling small representations *up* too
   matters: the noise is sized for ``B`` whatever the input's own norm.
2. **Nullify**: pick ``k = round(mu * d)`` of the ``d`` positions uniformly at random,
   independently of ``x``, and set them to zero: ``r'' = r' * m`` (``mu`` is the
   ``nullification_rate``).
3. **Noise**: ``r~ = r'' + Z`` with ``Z`` i.i.d. Laplace of scale ``b = 2B / epsilon``
   on all ``d`` elements (nullified ones too).

Privacy. Neighbouring inputs are *any* two inputs ``x, x'`` of the device (the query
input replaced by any other one): the guarantee hides what the input is, not whether
some record is in a dataset. For every mask ``m``,
``||(r'(x) - r'(x')) * m||_1 <= ||r'(x)||_1 + ||r'(x')||_1 <= 2B``, so the L1
sensitivity of ``x -> r''`` is ``2B`` and the Laplace mechanism with scale
``2B / epsilon`` makes each query ``epsilon``-differentially private (pure, delta = 0).
The mask is drawn independently of ``x``, so the output, a mixture over masks of
``epsilon``-DP releases, is ``epsilon``-DP as well. Nullification is extra
randomness on top: no amplification of epsilon is claimed for it.

Each perturbed input is one query: :meth:`Perturbation.event` gives the
:class:`~veil.privacy.PrivacyEvent` (``"laplace"``, noise multiplier
``b / sensitivity = 1 / epsilon``) a device records in its privacy ledger.

Noise sources: :class:`GeneratorLaplace` (a seeded ``torch.Generator``: reproducible,
for experiments and noisy training, not secure) and :class:`SecureLaplace`
(``os.urandom``; what a device should use). Neither protects against floating-point
attacks on the noise (Mironov 2012) or timing side channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from veil.errors import PrivacyError
from veil.privacy import PrivacyEvent, SecureNoise

__all__ = [
    "GeneratorLaplace",
    "L1Bound",
    "LaplaceSource",
    "Perturbation",
    "SecureLaplace",
    "bound_l1",
    "nullify",
]

# Relative shrink of a scaled representation, covering float32 rounding.
_MARGIN = 1e-6


class LaplaceSource(Protocol):
    """Draws Laplace noise."""

    def laplace(self, shape: torch.Size, scale: float) -> torch.Tensor:
        """A float32 tensor of ``shape`` with i.i.d. Laplace(0, ``scale``) entries."""
        ...


class GeneratorLaplace:
    """Laplace noise from a seeded ``torch.Generator`` (reproducible, not secure).

    ``Z = scale * (E1 - E2)`` with ``E1, E2`` i.i.d. standard exponentials.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def laplace(self, shape: torch.Size, scale: float) -> torch.Tensor:
        """A float32 tensor of ``shape`` with i.i.d. Laplace(0, ``scale``) entries."""
        e = torch.empty((2, *shape), dtype=torch.float64)
        e.exponential_(generator=self.generator)
        return ((e[0] - e[1]) * scale).float()


class SecureLaplace:
    """Laplace noise from the operating system's CSPRNG (``os.urandom``).

    ``Z = scale * (log U2 - log U1)`` with ``U1, U2`` i.i.d. uniform on (0, 1] with 53
    random bits each (the difference of two standard exponentials), in float64.
    """

    def laplace(self, shape: torch.Size, scale: float) -> torch.Tensor:
        """A float32 tensor of ``shape`` with i.i.d. Laplace(0, ``scale``) entries."""
        n = math.prod(shape)
        u = SecureNoise.uniform(2 * n)
        values = (np.log(u[n:]) - np.log(u[:n])) * scale
        return torch.from_numpy(values).float().reshape(shape)


def bound_l1(r: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale each example of ``r`` to L1 norm ``bound`` (a zero example stays zero).

    Args:
        r: representations, shape ``(N, ...)``; each example is flattened.
        bound: the norm bound ``B``, finite and > 0.

    Returns:
        float32 tensor of ``r``'s shape: ``r[i] * B' / ||r[i]||_1`` with
        ``B' = B * (1 - 1e-6)`` (the margin covers float32 rounding), computed in
        float64, so that every ``||out[i]||_1 <= B``. Scaling up as well as down
        gives every representation the largest signal the noise (sized for ``B``)
        allows. Written with export-friendly operations: :class:`L1Bound` runs it
        inside the exported device part.
    """
    _check_bound(bound)
    flat = r.flatten(1).double()
    norms = flat.abs().sum(dim=1, keepdim=True).clamp_min(1e-300)
    return (flat * (bound * (1 - _MARGIN) / norms)).float().reshape(r.shape)


class L1Bound(nn.Module):
    """:func:`bound_l1` as a layer, the last layer of a device part.

    Args:
        bound: the norm bound ``B``, finite and > 0.
    """

    def __init__(self, bound: float) -> None:
        super().__init__()
        _check_bound(bound)
        self.bound = bound

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return bound_l1(r, self.bound)

    def extra_repr(self) -> str:
        return f"bound={self.bound}"


def nullify(r: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Zero ``round(rate * d)`` of each example's ``d`` elements, chosen uniformly.

    The positions are drawn from ``generator`` only, never from ``r``.

    Args:
        r: representations, shape ``(N, ...)``.
        rate: the nullification rate ``mu``, in [0, 1).
        generator: source of the positions.

    Returns:
        A new tensor: ``r`` with the chosen elements set to 0.
    """
    _check_rate(rate)
    flat = r.reshape(len(r), -1)
    k = round(rate * flat.shape[1])
    if k == 0:
        return r.clone()
    keys = torch.rand(flat.shape, generator=generator)
    dropped = keys.topk(k, dim=1).indices
    out = flat.clone()
    out.scatter_(1, dropped, 0.0)
    return out.reshape(r.shape)


@dataclass(frozen=True)
class Perturbation:
    """ARDEN's device-side perturbation: bound, nullify, add Laplace noise.

    See the module docstring for the mechanism and its proof.

    Attributes:
        bound: the L1 norm bound ``B`` of a representation, finite and > 0.
        nullification_rate: the fraction ``mu`` of elements zeroed, in [0, 1).
        epsilon: per-query epsilon, finite and > 0: one perturbed input is
            ``epsilon``-DP with respect to replacing that input by any other.
    """

    bound: float
    nullification_rate: float
    epsilon: float

    def __post_init__(self) -> None:
        _check_bound(self.bound)
        _check_rate(self.nullification_rate)
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise PrivacyError(
                f"epsilon must be finite and > 0, got {self.epsilon!r}; to switch "
                "the noise off, do not perturb"
            )

    @property
    def sensitivity(self) -> float:
        """L1 sensitivity of the bounded, nullified representation: ``2B``."""
        return 2 * self.bound

    @property
    def scale(self) -> float:
        """The Laplace scale ``b = sensitivity / epsilon = 2B / epsilon``."""
        return self.sensitivity / self.epsilon

    def event(self, count: int, source: str = "inference-query") -> PrivacyEvent:
        """The ledger event of ``count`` perturbed inputs (noise multiplier
        ``scale / sensitivity = 1 / epsilon``)."""
        return PrivacyEvent(
            "laplace", self.scale / self.sensitivity, 1.0, count, source
        )

    def __call__(
        self,
        r: torch.Tensor,
        generator: torch.Generator,
        noise: LaplaceSource | None = None,
    ) -> torch.Tensor:
        """Perturb representations ``r`` of shape ``(N, ...)``, example by example.

        Args:
            r: the device part's output.
            generator: draws the nullified positions (and the noise when ``noise``
                is ``None``).
            noise: where the Laplace noise comes from; default
                ``GeneratorLaplace(generator)``.

        Returns:
            float32 tensor of ``r``'s shape.
        """
        source = GeneratorLaplace(generator) if noise is None else noise
        kept = nullify(bound_l1(r, self.bound), self.nullification_rate, generator)
        return kept + source.laplace(kept.shape, self.scale)


def _check_bound(bound: float) -> None:
    if not (math.isfinite(bound) and bound > 0):
        raise PrivacyError(f"bound must be finite and > 0, got {bound!r}")


def _check_rate(rate: float) -> None:
    if not (math.isfinite(rate) and 0 <= rate < 1):
        raise PrivacyError(f"nullification_rate must be in [0, 1), got {rate!r}")
