"""DP-SGD as a local trainer: the private counterpart of ``SGDTrainer``.

:class:`DPSGDTrainer` follows the :class:`~veil.learning.local.LocalTrainer` protocol,
so it can be a FedAvg client's local training (each client then spends privacy on its
own examples and keeps its own ledger) or, on pooled data, centralised DP training.
Each step draws a Poisson sample of the examples, computes the clipped and noised mean
gradient (:mod:`veil.privacy.dpsgd`) and applies an SGD update. Every step, empty
samples included, is recorded in the trainer's
:class:`~veil.privacy.ledger.PrivacyLedger` if it has one; if that ledger holds a
budget, the trainer runs only the steps the budget affords and then raises
:class:`~veil.errors.BudgetExceededError` (the model keeps the updates of the steps
that ran).

Not covered by the guarantee: the mean training loss in the returned ``TrainStats``
is computed from the private examples without noise. Report it only where the data's
owner may see it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from veil.errors import BudgetExceededError, ConfigError
from veil.learning.local import TrainStats
from veil.privacy.dpsgd import ENGINES, NoisyGradientStep
from veil.privacy.ledger import PrivacyEvent, PrivacyLedger
from veil.privacy.noise import GeneratorNoise, NoiseSource, SecureNoise

__all__ = ["DPSGDTrainer"]


@dataclass(frozen=True)
class DPSGDTrainer:
    """Local training with DP-SGD and Poisson sampling.

    Give exactly one of ``sample_rate`` and ``expected_batch_size``; ``steps``, when
    given, replaces ``epochs``.

    Attributes:
        lr: learning rate, > 0.
        clipping_norm: largest L2 norm of one example's gradient (all trainable
            parameters together), > 0.
        noise_multiplier: noise standard deviation divided by ``clipping_norm``, >= 0
            (0 trains without privacy and makes epsilon infinite).
        sample_rate: probability that an example is in a step's batch, in (0, 1].
        expected_batch_size: mean batch size ``sample_rate * N``, > 0; converted to a
            sample rate from the number ``N`` of examples passed to :meth:`train`.
        epochs: expected passes over the data, > 0; default 1. Steps run:
            ``max(1, round(epochs / sample_rate))``.
        steps: number of steps, >= 1, or ``None`` (default) to use ``epochs``.
        max_physical_batch: most per-example gradients held in memory at once, >= 1;
            default 256. Does not change the result or the accounting.
        momentum: SGD momentum in [0, 1); default 0.
        secure_noise: draw noise *and* the Poisson samples from the OS's CSPRNG instead
            of the training generator (not reproducible; see :mod:`veil.privacy.noise`);
            default False.
        ledger: where each step is recorded (and whose budget is enforced), or
            ``None``. In FedAvg give each client its own (:meth:`with_ledger`).
        source: name written on the ledger's events; default ``"dpsgd"``.
        engine: how clipped gradients are computed, ``"auto"`` (default),
            ``"functional"`` or ``"ghost"``; see :func:`~veil.privacy.noisy_gradient`.
            Does not change the result or the accounting.
    """

    lr: float
    clipping_norm: float
    noise_multiplier: float
    sample_rate: float | None = None
    expected_batch_size: float | None = None
    epochs: float = 1.0
    steps: int | None = None
    max_physical_batch: int = 256
    momentum: float = 0.0
    secure_noise: bool = False
    ledger: PrivacyLedger | None = field(default=None, compare=False)
    source: str = "dpsgd"
    engine: str = "auto"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ConfigError(f"clipping_norm must be > 0, got {self.clipping_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(
                f"noise_multiplier must be >= 0, got {self.noise_multiplier}"
            )
        if (self.sample_rate is None) == (self.expected_batch_size is None):
            raise ConfigError(
                "give exactly one of sample_rate and expected_batch_size, got "
                f"sample_rate={self.sample_rate}, "
                f"expected_batch_size={self.expected_batch_size}"
            )
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.expected_batch_size is not None and not self.expected_batch_size > 0:
            raise ConfigError(
                f"expected_batch_size must be > 0, got {self.expected_batch_size}"
            )
        if not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1 or None, got {self.steps}")
        if self.max_physical_batch < 1:
            raise ConfigError(
                f"max_physical_batch must be >= 1, got {self.max_physical_batch}"
            )
        if self.engine not in ENGINES:
            raise ConfigError(
                f"engine must be one of {list(ENGINES)}, got {self.engine!r}"
            )
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")

    def with_ledger(self, ledger: PrivacyLedger | None) -> DPSGDTrainer:
        """A copy of this trainer that records into ``ledger``."""
        return replace(self, ledger=ledger)

    def resolve_sample_rate(self, num_examples: int) -> float:
        """The Poisson sample rate used on ``num_examples`` examples."""
        if self.sample_rate is not None:
            return self.sample_rate
        assert self.expected_batch_size is not None
        if self.expected_batch_size > num_examples:
            raise ConfigError(
                f"expected_batch_size must be <= the number of examples "
                f"({num_examples}), got {self.expected_batch_size}"
            )
        return self.expected_batch_size / num_examples

    def planned_steps(self, num_examples: int) -> int:
        """Steps one call to :meth:`train` runs on ``num_examples`` examples (when the
        budget allows)."""
        if self.steps is not None:
            return self.steps
        return max(1, round(self.epochs / self.resolve_sample_rate(num_examples)))

    def step_event(self, num_examples: int) -> PrivacyEvent:
        """The ledger event of one step on ``num_examples`` examples."""
        return PrivacyEvent(
            "gaussian",
            self.noise_multiplier,
            self.resolve_sample_rate(num_examples),
            1,
            self.source,
        )

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> TrainStats:
        """Run DP-SGD on ``(x, y)`` in place.

        Args:
            model: the network; trained in place. BatchNorm is refused.
            x: the examples, shape ``(N, ...)``, ``N >= 1``.
            y: the labels, shape ``(N,)``.
            generator: source of the Poisson samples and of the noise (unless
                ``secure_noise``).

        Raises:
            BudgetExceededError: the ledger's budget does not afford all planned
                steps; the affordable ones ran first. ``result`` holds their stats.
        """
        n = len(y)
        if n == 0:
            raise ConfigError("a DP-SGD client needs at least one example, got 0")
        q = self.resolve_sample_rate(n)
        event = self.step_event(n)
        planned = self.planned_steps(n)
        allowed = (
            planned if self.ledger is None else self.ledger.affordable(event, planned)
        )

        model.train()
        optimizer = torch.optim.SGD(
            model.parameters(), lr=self.lr, momentum=self.momentum
        )
        params = dict(model.named_parameters())
        noise: NoiseSource = (
            SecureNoise() if self.secure_noise else GeneratorNoise(generator)
        )
        step = NoisyGradientStep(  # checks the model once, not every step
            model,
            clipping_norm=self.clipping_norm,
            noise_multiplier=self.noise_multiplier,
            noise=noise,
            max_physical_batch=self.max_physical_batch,
            engine=self.engine,
        )
        loss_sum, seen = 0.0, 0
        for _ in range(allowed):
            idx = self._poisson_sample(n, q, generator)
            result = step(x[idx], y[idx], expected_batch_size=q * n)
            optimizer.zero_grad(set_to_none=True)
            for name, g in result.grads.items():
                params[name].grad = g
            optimizer.step()
            if self.ledger is not None:
                self.ledger.record(event)
            loss_sum += result.loss_sum
            seen += result.batch_size

        stats = TrainStats(loss_sum / max(seen, 1), allowed, seen)
        if allowed < planned:
            assert self.ledger is not None and self.ledger.budget is not None
            raise BudgetExceededError(
                steps_done=allowed,
                epsilon_spent=self.ledger.epsilon(),
                epsilon_next=self.ledger.epsilon_with(event),
                budget_epsilon=self.ledger.budget.epsilon,
                budget_delta=self.ledger.budget.delta,
                result=stats,
            )
        return stats

    def _poisson_sample(
        self, n: int, q: float, generator: torch.Generator
    ) -> torch.Tensor:
        if q >= 1:
            return torch.arange(n)
        if self.secure_noise:
            uniform = torch.from_numpy(SecureNoise.uniform(n))
        else:
            uniform = torch.rand(n, generator=generator, dtype=torch.float64)
        return torch.nonzero(uniform < q).flatten()
