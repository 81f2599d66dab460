"""The device side of private inference: run the device part, perturb, keep the ledger.

A :class:`Device` holds what a phone holds: the frozen device part (ending in its
:class:`~veil.inference.perturb.L1Bound`), the :class:`Perturbation`, a
:class:`~veil.privacy.PrivacyLedger` of every query it has answered and a budget.
:meth:`Device.perturb` turns inputs into the perturbed representations that may be
sent to the cloud, one query per input, and refuses a call that would exceed the
budget before computing anything.

Accounting. Each query is pure ``epsilon``-DP (see :mod:`veil.inference.perturb`),
recorded as ``PrivacyEvent("laplace", 1 / epsilon, count=n)``. The budget is checked
with basic composition, ``sum of count / noise_multiplier`` over the ledger's Laplace
events (:func:`pure_epsilon`): the ``epsilon`` of all queries together, delta = 0, if
any of the device's inputs may be replaced by any other. That bound is proven for any
pure-DP mechanism. The ledger's own ``epsilon(delta)`` (dp-accounting's PLD) treats
each event as a one-dimensional Laplace mechanism; it is at most the basic bound, and
for per-query epsilons of 1 or more it is within a few percent of it.

The ledger is created with dp-accounting's ``add_or_remove_one`` relation, the only
one its Laplace accounting accepts: for an unsampled Laplace event this only fixes the
unit in which the noise multiplier is read, here the sensitivity ``2B`` under
replacement of the input.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import torch
from torch import nn

from veil.errors import BudgetExceededError, PrivacyError
from veil.inference.perturb import (
    GeneratorLaplace,
    LaplaceSource,
    Perturbation,
    SecureLaplace,
)
from veil.privacy import InsecureNoiseWarning, PrivacyLedger

__all__ = ["Device", "pure_epsilon"]

logger = logging.getLogger(__name__)

# Relative slack when comparing sums of per-query epsilons to the budget.
_TOLERANCE = 1e-9
_warned = False


def _warn_insecure() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "the device draws its Laplace noise from a seeded torch.Generator, which "
            "is not cryptographically secure: whoever knows the seed can remove the "
            "noise. Fine for experiments; on a phone use SecureLaplace (the default).",
            InsecureNoiseWarning,
            stacklevel=3,
        )


def pure_epsilon(ledger: PrivacyLedger) -> float:
    """Epsilon of every event in ``ledger`` by basic composition (delta = 0).

    The sum over events of ``count / noise_multiplier``: exact per event for the
    Laplace mechanism, and a valid bound for their composition. ``inf`` if an event
    has no noise.

    Raises:
        PrivacyError: the ledger holds a non-Laplace event (not pure DP).
    """
    total = 0.0
    for event in ledger.events:
        if event.mechanism != "laplace" or event.sample_rate != 1:
            raise PrivacyError(
                "pure_epsilon needs unsampled Laplace events only, got "
                f"{event.mechanism!r} with sample_rate {event.sample_rate}"
            )
        if event.noise_multiplier == 0:
            return math.inf
        total += event.count / event.noise_multiplier
    return total


class Device:
    """A phone's half of private inference.

    Args:
        device_part: the frozen first layers, input ``(N, *input_shape)`` to
            representations ``(N, d)``; it should end in an ``L1Bound`` (the
            perturbation bounds again anyway).
        perturbation: bound, nullification rate and per-query epsilon.
        budget_epsilon: the most ``pure_epsilon(ledger)`` may reach, > 0, or
            ``None`` for no cap.
        ledger: the device's privacy ledger (a new one by default); every query is
            recorded in it.
        noise: Laplace source; default :class:`SecureLaplace` (``os.urandom``).
        generator: draws the nullified positions; default seeded from the OS.
    """

    def __init__(
        self,
        device_part: nn.Module,
        perturbation: Perturbation,
        budget_epsilon: float | None = None,
        ledger: PrivacyLedger | None = None,
        noise: LaplaceSource | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if budget_epsilon is not None and not (
            math.isfinite(budget_epsilon) and budget_epsilon > 0
        ):
            raise PrivacyError(
                f"budget_epsilon must be finite and > 0 or None, got {budget_epsilon!r}"
            )
        self.device_part = device_part.eval().requires_grad_(False)
        self.perturbation = perturbation
        self.budget_epsilon = budget_epsilon
        self.ledger = PrivacyLedger() if ledger is None else ledger
        self.noise = SecureLaplace() if noise is None else noise
        if isinstance(self.noise, GeneratorLaplace):
            _warn_insecure()
        self.generator = generator or torch.Generator().manual_seed(
            int.from_bytes(os.urandom(8), "big") >> 1
        )
        pure_epsilon(self.ledger)  # refuses a ledger that is not pure Laplace

    @property
    def epsilon_spent(self) -> float:
        """Epsilon of every query so far (basic composition, delta = 0)."""
        return pure_epsilon(self.ledger)

    def queries_left(self) -> int | None:
        """How many more inputs the budget affords, or ``None`` without a budget."""
        if self.budget_epsilon is None:
            return None
        room = self.budget_epsilon * (1 + _TOLERANCE) - self.epsilon_spent
        return max(0, math.floor(room / self.perturbation.epsilon))

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """Perturbed representations of the inputs ``x`` (``N`` queries).

        Args:
            x: inputs, shape ``(N, *input_shape)``, N >= 1.

        Returns:
            float32 tensor ``(N, d)``, safe to send to the cloud.

        Raises:
            BudgetExceededError: the ``N`` queries would take ``epsilon_spent``
                over ``budget_epsilon``; nothing is computed or recorded.
        """
        n = len(x)
        if n < 1:
            raise PrivacyError(f"x must hold at least one input, got shape {x.shape}")
        self._check_budget(n)
        with torch.inference_mode():
            r = self.device_part(x).flatten(1)
        out = self.perturbation(r, self.generator, self.noise)
        self.ledger.record(self.perturbation.event(n))
        logger.info(
            "device: %d queries at epsilon %g, spent %.4g",
            n,
            self.perturbation.epsilon,
            self.epsilon_spent,
        )
        return out

    def _check_budget(self, n: int) -> None:
        left = self.queries_left()
        if left is None or n <= left:
            return
        spent = self.epsilon_spent
        assert self.budget_epsilon is not None
        raise BudgetExceededError(
            steps_done=0,
            epsilon_spent=spent,
            epsilon_next=spent + n * self.perturbation.epsilon,
            budget_epsilon=self.budget_epsilon,
            budget_delta=0.0,
        )
