"""The pieces of user-level DP that act on one round's updates.

DP-FedAvg (:mod:`veil.learning.dp_fedavg`) protects a whole client: every client's
update is clipped to an L2 norm ``S`` (:func:`clip_update`), so adding or removing
one client moves the sum of updates by at most ``S``, and Gaussian noise of standard
deviation ``z * S`` is added to that sum exactly once. This module holds:

- clipping: :func:`update_norm`, :func:`clip_update`;
- where the noise is added, :class:`NoisePlan`: all of it by the server (central DP,
  the server is trusted), or a share ``N(0, std**2 / n)`` by each of the ``n``
  sampled clients so that only their sum carries the full noise (distributed DP,
  meant for secure aggregation, where the server sees only the sum);
  :func:`add_noise` adds one such draw to an update;
- adaptive clipping (Andrew et al. 2021), :class:`AdaptiveClipping`: ``S`` follows
  a target quantile of the update norms through a noisy count of unclipped updates.
  Releasing the count is a second Gaussian mechanism; :func:`combined_noise_multiplier`
  gives the one noise multiplier that accounts for the pair.

Everything here is plain PyTorch and arithmetic, with no I/O.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from veil.errors import PrivacyError
from veil.learning._types import StateDict
from veil.privacy import NoiseSource

__all__ = [
    "AdaptiveClipping",
    "ClientSampling",
    "NoisePlacement",
    "NoisePlan",
    "add_noise",
    "clip_update",
    "combined_noise_multiplier",
    "update_noise_multiplier",
    "update_norm",
]


class ClientSampling(enum.StrEnum):
    """How a round's clients are chosen.

    ``poisson``: each client independently with probability ``sample_rate``;
    ``fixed``: exactly ``sample_rate * num_clients`` clients, uniformly without
    replacement. Each has its own accounting (see :mod:`veil.learning.dp_fedavg`).
    """

    POISSON = "poisson"
    FIXED = "fixed"


class NoisePlacement(enum.StrEnum):
    """Who adds the noise: the trust model the guarantee holds under.

    ``central``: the server adds all of it; the guarantee holds against everyone who
    sees the model, but not against the server, which sees each clipped update.
    ``distributed``: each sampled client adds a share; with secure aggregation the
    server sees only the noisy sum, so the guarantee holds against the server too.
    """

    CENTRAL = "central"
    DISTRIBUTED = "distributed"


def update_norm(update: StateDict) -> float:
    """The L2 norm of all tensors of ``update`` together (computed in float64)."""
    total = sum(float(t.double().square().sum()) for t in update.values())
    return math.sqrt(total)


def clip_update(update: StateDict, clipping_norm: float) -> StateDict:
    """``update`` scaled by ``min(1, clipping_norm / norm)``: a copy whose L2 norm is
    at most ``clipping_norm`` (an update already within it is returned unchanged).

    Args:
        update: tensors by name.
        clipping_norm: largest L2 norm allowed, > 0 (finite).
    """
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise PrivacyError(f"clipping_norm must be finite and > 0, got {clipping_norm}")
    norm = update_norm(update)
    factor = 1.0 if norm <= clipping_norm else clipping_norm / norm
    return {name: t * factor for name, t in update.items()}


def add_noise(
    update: StateDict, std: float, noise: NoiseSource, dtype: torch.dtype | None = None
) -> StateDict:
    """A copy of ``update`` with i.i.d. ``N(0, std**2)`` added to every entry.

    Args:
        update: tensors by name.
        std: noise standard deviation, >= 0 (0 returns a plain copy).
        noise: where the noise is drawn from (seeded or secure).
        dtype: compute in this dtype (default: each tensor's own).
    """
    out: StateDict = {}
    for name, t in update.items():
        t = t if dtype is None else t.to(dtype)
        out[name] = t + noise.normal(t.shape, std, t.dtype) if std > 0 else t.clone()
    return out


@dataclass(frozen=True)
class NoisePlan:
    """Standard deviations of the noise each party adds in one round.

    The update sum must carry ``N(0, update_std**2)`` and the unclipped count
    ``N(0, count_std**2)``, exactly once. Under ``central`` the server adds both;
    under ``distributed`` each of the ``num_clients`` sampled clients adds
    ``std / sqrt(num_clients)``, so the sum of the ``n`` independent shares has
    variance ``std**2``, and the server adds nothing. With no client sampled, the
    server adds the full noise itself (the release must still be noisy).

    Attributes:
        server_update_std: noise the server adds to the update sum.
        client_update_std: noise each client adds to its clipped update.
        server_count_std: noise the server adds to the unclipped count.
        client_count_std: noise each client adds to its unclipped indicator.
    """

    server_update_std: float
    client_update_std: float
    server_count_std: float
    client_count_std: float

    @classmethod
    def for_round(
        cls,
        placement: str,
        update_std: float,
        count_std: float,
        num_clients: int,
    ) -> NoisePlan:
        """The plan for a round with ``num_clients`` sampled clients.

        Args:
            placement: ``"central"`` or ``"distributed"``.
            update_std: total noise on the update sum (``z * S``), >= 0.
            count_std: total noise on the unclipped count (``sigma_b``), >= 0.
            num_clients: clients sampled this round, >= 0.
        """
        if min(update_std, count_std) < 0 or num_clients < 0:
            raise PrivacyError(
                "update_std, count_std and num_clients must be >= 0, got "
                f"{update_std}, {count_std} and {num_clients}"
            )
        if NoisePlacement(placement) is NoisePlacement.CENTRAL or num_clients == 0:
            return cls(update_std, 0.0, count_std, 0.0)
        share = 1 / math.sqrt(num_clients)
        return cls(0.0, update_std * share, 0.0, count_std * share)


def combined_noise_multiplier(
    update_multiplier: float, count_noise_multiplier: float
) -> float:
    """The noise multiplier ``z`` of the update sum and the unclipped count together.

    The count sums ``b_k - 1/2`` with ``b_k`` in {0, 1}: one client moves it by at
    most 1/2, so noise ``sigma_b`` on it is a noise multiplier of ``2 * sigma_b``.
    Releasing both is one Gaussian mechanism on the concatenated vector (Andrew et
    al. 2021, Theorem 1), with ``z**-2 = z_update**-2 + (2 * sigma_b)**-2``.

    Args:
        update_multiplier: noise std on the update sum over ``S``, > 0.
        count_noise_multiplier: ``sigma_b``, noise std on the count, > 0.
    """
    if not (update_multiplier > 0 and count_noise_multiplier > 0):
        raise PrivacyError(
            "update_multiplier and count_noise_multiplier must be > 0, got "
            f"{update_multiplier} and {count_noise_multiplier}"
        )
    precision = update_multiplier**-2 + (2 * count_noise_multiplier) ** -2
    return float(precision**-0.5)


def update_noise_multiplier(
    noise_multiplier: float, count_noise_multiplier: float
) -> float:
    """The noise multiplier the update sum needs so that, with the count's noise
    ``sigma_b``, the pair spends what ``noise_multiplier`` alone would (the inverse
    of :func:`combined_noise_multiplier`): ``(z**-2 - (2 sigma_b)**-2)**-1/2``.

    Raises:
        PrivacyError: ``2 * sigma_b <= z``: the count alone would spend more than
            the whole round may; raise ``count_noise_multiplier``.
    """
    if not noise_multiplier > 0 or not 2 * count_noise_multiplier > noise_multiplier:
        raise PrivacyError(
            "count_noise_multiplier must be greater than noise_multiplier / 2 so that "
            "the unclipped count leaves room for the update's noise, got "
            f"count_noise_multiplier={count_noise_multiplier} and noise_multiplier="
            f"{noise_multiplier}; McMahan and Andrew use about expected clients / 20"
        )
    precision = noise_multiplier**-2 - (2 * count_noise_multiplier) ** -2
    return float(precision**-0.5)


@dataclass(frozen=True)
class AdaptiveClipping:
    """Geometric update of the clipping norm toward a quantile (Andrew et al. 2021).

    After each round ``S <- S * exp(-learning_rate * (b - target_quantile))``, where
    ``b`` is the noisy fraction of this round's updates whose norm was at most ``S``.
    At the fixed point a ``target_quantile`` fraction of updates are unclipped.

    Attributes:
        target_quantile: gamma, the fraction of updates to leave unclipped, in (0, 1);
            default 0.5 (the median norm).
        learning_rate: eta, step of the geometric update, > 0; default 0.2.
        count_noise_multiplier: sigma_b, noise std on the count of unclipped updates,
            > 0. Its privacy cost is part of the round's noise multiplier (see
            :func:`update_noise_multiplier`).
    """

    count_noise_multiplier: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise PrivacyError(
                f"target_quantile must be in (0, 1), got {self.target_quantile}"
            )
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise PrivacyError(
                f"learning_rate must be finite and > 0, got {self.learning_rate}"
            )
        if not (
            math.isfinite(self.count_noise_multiplier)
            and self.count_noise_multiplier > 0
        ):
            raise PrivacyError(
                "count_noise_multiplier must be finite and > 0, got "
                f"{self.count_noise_multiplier}"
            )

    def next_clipping_norm(self, clipping_norm: float, unclipped: float) -> float:
        """The clipping norm for the next round.

        Args:
            clipping_norm: this round's ``S``, > 0.
            unclipped: noisy fraction of updates with norm <= ``S`` (may fall
                outside [0, 1] because of the noise).
        """
        step = -self.learning_rate * (unclipped - self.target_quantile)
        return clipping_norm * math.exp(step)
