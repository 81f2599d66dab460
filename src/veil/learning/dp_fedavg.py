"""DP-FedAvg (McMahan et al. 2018): federated averaging with user-level DP.

A round, in the terms of :mod:`veil.runtime`:

1. ``configure_round`` (server): check the privacy budget, then sample clients,
   either each independently with probability ``q`` (Poisson) or exactly
   ``q * N`` of them without replacement (fixed-size). Each task carries the round's
   clipping norm ``S`` and, under distributed DP, each client's noise share.
2. ``client_fit`` (client): train locally from the global model, clip the update to
   L2 norm ``S``, note whether it needed clipping (for adaptive clipping), and under
   distributed DP add its share of the noise.
3. ``aggregate`` (server): sum the clipped updates, add the noise (central DP) or
   nothing (distributed DP: the shares already sum to it), divide by the *expected*
   number of clients ``q * N`` (never the sampled number, which would leak it), take
   a server step ``w += server_lr * v`` with momentum ``v``, record the round in the
   privacy ledger and, with adaptive clipping, move ``S`` toward the target quantile.

What the ledger records per round: one Gaussian mechanism of noise multiplier ``z``
(with adaptive clipping, the combined multiplier of the update and the count, see
:mod:`veil.learning.user_dp`) on a sample of clients, Poisson at rate ``q`` or
fixed-size ``q * N`` of ``N`` (accounted with ``rdp`` under ``replace_one``, the only
analysis ``dp-accounting`` offers for it; replacing a client moves the sum by up to
``2 S``, so that event's noise multiplier is ``z / 2``). Epsilon therefore protects
one client, all its examples together, against whoever sees the models (central)
or, with secure aggregation, against the server too (distributed).

The updates are averaged with equal weight: a client with many examples counts as
much as one with few, which keeps each client's influence at ``S``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from veil._seeding import Stream, derive_seed, numpy_rng, torch_generator
from veil.errors import ConfigError, UpdateError
from veil.learning._types import ClientResult, ClientTask, StateDict
from veil.learning.fedavg import check_update
from veil.learning.local import LocalTrainer
from veil.learning.server_opt import check_server_optimizer, server_step
from veil.learning.user_dp import (
    AdaptiveClipping,
    ClientSampling,
    NoisePlacement,
    NoisePlan,
    add_noise,
    clip_update,
    update_noise_multiplier,
    update_norm,
)
from veil.privacy import (
    GeneratorNoise,
    NoiseSource,
    PrivacyEvent,
    PrivacyLedger,
    SecureNoise,
)

__all__ = ["DPFedAvg", "RoundRecord"]

logger = logging.getLogger(__name__)

# Names of the settings a task carries and of the indicator a result carries.
CLIPPING_NORM = "clipping_norm"
UPDATE_NOISE_STD = "update_noise_std"
COUNT_NOISE_STD = "count_noise_std"
UNCLIPPED = "unclipped"


@dataclass(frozen=True)
class RoundRecord:
    """What one aggregated round did (for metrics and reports).

    Attributes:
        round: the round number.
        clients: clients sampled (and aggregated).
        clipping_norm: ``S`` used in the round.
        unclipped: the noisy fraction of updates with norm <= ``S`` (``nan``
            without adaptive clipping).
        mean_norm: mean L2 norm of the updates before clipping (the server sees it
            only under central DP; kept for diagnostics, not released).
    """

    round: int
    clients: int
    clipping_norm: float
    unclipped: float
    mean_norm: float


@dataclass
class DPFedAvg:
    """The DP-FedAvg server and client logic, free of I/O.

    Attributes:
        global_state: the global model's tensors; replaced after every round.
        num_clients: N, clients in the population, >= 1.
        sample_rate: q in (0, 1]: each client's probability of taking part
            (Poisson), or the fraction taking part (fixed-size; ``q * N`` must be a
            whole number).
        clipping_norm: S, the initial L2 bound of a client's update, > 0.
        noise_multiplier: z, the round's noise multiplier as accounted, >= 0. With
            adaptive clipping it covers the update and the count together.
        trainer: the local trainer every client runs.
        ledger: the user-level privacy ledger; one event per round is recorded.
        sampling: ``"poisson"`` (default) or ``"fixed"``.
        placement: ``"central"`` (default) or ``"distributed"``.
        adaptive: adaptive clipping settings, or ``None`` for a fixed ``S``.
        server_lr: server learning rate on the averaged update, > 0; default 1.
        server_momentum: server momentum in [0, 1); default 0.
        seed: the run's seed.
        secure_noise: draw noise and the Poisson sample from ``os.urandom``.
        history: one :class:`RoundRecord` per aggregated round.
    """

    global_state: StateDict
    num_clients: int
    sample_rate: float
    clipping_norm: float
    noise_multiplier: float
    trainer: LocalTrainer
    ledger: PrivacyLedger
    sampling: str = "poisson"
    placement: str = "central"
    adaptive: AdaptiveClipping | None = None
    server_lr: float = 1.0
    server_momentum: float = 0.0
    seed: int = 0
    secure_noise: bool = False
    history: list[RoundRecord] = field(default_factory=list)
    _velocity: StateDict | None = field(default=None, repr=False)
    _sampled: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._check_settings()
        self.sampling = ClientSampling(self.sampling).value
        self.placement = NoisePlacement(self.placement).value
        if self.adaptive is not None and self.noise_multiplier > 0:
            # Refuses a count noise that leaves no room for the update's noise.
            update_noise_multiplier(
                self.noise_multiplier, self.adaptive.count_noise_multiplier
            )

    def _check_settings(self) -> None:
        if self.num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {self.num_clients}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ConfigError(
                f"clipping_norm must be finite and > 0, got {self.clipping_norm}"
            )
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(
                f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}"
            )
        check_server_optimizer(self.server_lr, self.server_momentum)
        if ClientSampling(self.sampling) is ClientSampling.FIXED:
            size = self.sample_rate * self.num_clients
            if abs(size - round(size)) > 1e-9 * self.num_clients or round(size) < 1:
                raise ConfigError(
                    "fixed-size sampling needs sample_rate * num_clients to be a "
                    f"whole number >= 1, got {self.sample_rate} * {self.num_clients}"
                )

    @property
    def expected_clients(self) -> float:
        """``q * N``: the denominator of the average, whatever the sampled number."""
        return self.sample_rate * self.num_clients

    @property
    def update_multiplier(self) -> float:
        """The noise multiplier on the update sum alone (``z`` without adaptive
        clipping; less noise-hungry than ``z`` once the count takes its share)."""
        if self.adaptive is None or self.noise_multiplier == 0:
            return self.noise_multiplier
        return update_noise_multiplier(
            self.noise_multiplier, self.adaptive.count_noise_multiplier
        )

    def round_event(self) -> PrivacyEvent:
        """The privacy event one round spends.

        Under fixed-size sampling the neighbouring relation is replace-one-client:
        replacing a client moves the sum by up to ``2 S``, so the event's noise
        multiplier (noise std over that sensitivity) is ``z / 2``. Under Poisson
        sampling (add or remove one client) it is ``z``.
        """
        fixed = ClientSampling(self.sampling) is ClientSampling.FIXED
        return PrivacyEvent(
            "gaussian",
            self.noise_multiplier / 2 if fixed else self.noise_multiplier,
            self.sample_rate,
            source=f"dp-fedavg/{self.placement}",
            population=self.num_clients if fixed else None,
        )

    def noise_plan(self, num_clients: int) -> NoisePlan:
        """Who adds how much noise in a round with ``num_clients`` sampled clients."""
        count_std = (
            0.0 if self.adaptive is None else self.adaptive.count_noise_multiplier
        )
        return NoisePlan.for_round(
            self.placement,
            self.update_multiplier * self.clipping_norm,
            count_std,
            num_clients,
        )

    def _noise(self, *keys: int) -> NoiseSource:
        if self.secure_noise:
            return SecureNoise()
        return GeneratorNoise(torch_generator(self.seed, Stream.DP_FEDAVG_NOISE, *keys))

    def sample_clients(self, rnd: int) -> list[int]:
        """The clients of round ``rnd``, in increasing order."""
        n = self.num_clients
        if ClientSampling(self.sampling) is ClientSampling.FIXED:
            rng = numpy_rng(self.seed, Stream.CLIENT_SAMPLING, rnd)
            size = round(self.expected_clients)
            return sorted(int(k) for k in rng.choice(n, size, replace=False))
        if self.secure_noise:
            uniform = SecureNoise.uniform(n) - 2.0**-53  # in [0, 1)
        else:
            uniform = numpy_rng(self.seed, Stream.CLIENT_SAMPLING, rnd).random(n)
        return [int(k) for k in np.flatnonzero(uniform < self.sample_rate)]

    def configure_round(self, rnd: int) -> list[ClientTask]:
        """Check the budget, sample this round's clients and build their tasks.

        Raises:
            BudgetExceededError: the round would exceed the ledger's budget; nothing
                is sampled or trained.
        """
        self.ledger.check(self.round_event())
        chosen = self.sample_clients(rnd)
        self._sampled = {rnd: len(chosen)}
        plan = self.noise_plan(len(chosen))
        settings = {
            CLIPPING_NORM: self.clipping_norm,
            UPDATE_NOISE_STD: plan.client_update_std,
            COUNT_NOISE_STD: plan.client_count_std,
        }
        return [
            ClientTask(
                client_id=k,
                round=rnd,
                seed=derive_seed(self.seed, Stream.LOCAL_TRAINING, rnd, k),
                global_state=self.global_state,
                settings=dict(settings),
            )
            for k in chosen
        ]

    def client_fit(
        self, task: ClientTask, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> ClientResult:
        """Train, clip the update to the task's ``S``, add the client's noise share."""
        model.load_state_dict(task.global_state)
        generator = torch.Generator().manual_seed(task.seed)
        stats = self.trainer.train(model, x, y, generator)
        with torch.no_grad():
            update = {
                name: value.detach() - task.global_state[name]
                for name, value in model.state_dict().items()
            }
        bound = task.settings[CLIPPING_NORM]
        norm = update_norm(update)
        clipped = clip_update(update, bound)
        # The indicator is centred (b - 1/2): one client moves the count by <= 1/2.
        indicator = (1.0 if norm <= bound else 0.0) - 0.5
        metrics = {"steps": float(stats.steps), UNCLIPPED: indicator}
        share_std = task.settings.get(UPDATE_NOISE_STD, 0.0)
        count_std = task.settings.get(COUNT_NOISE_STD, 0.0)
        if NoisePlacement(self.placement) is NoisePlacement.DISTRIBUTED:
            noise = self._client_noise(task)
            clipped = add_noise(clipped, share_std, noise)
            if count_std > 0:
                draw = noise.normal(torch.Size([1]), count_std, torch.float64)
                metrics[UNCLIPPED] += float(draw)
        else:
            metrics["norm"] = norm  # the trusted server sees the update anyway
        return ClientResult(
            task.client_id, task.round, clipped, len(y), stats.loss, metrics
        )

    def _client_noise(self, task: ClientTask) -> NoiseSource:
        if self.secure_noise:
            return SecureNoise()
        return GeneratorNoise(torch.Generator().manual_seed(derive_seed(task.seed, 1)))

    def aggregate(self, rnd: int, results: Sequence[ClientResult]) -> None:
        """Sum the clipped updates, add the server's noise, divide by ``q * N``,
        take the server step, record the round and adapt ``S``.

        Raises:
            UpdateError: a result from another round or a malformed update; the
                global model, the ledger and ``S`` are left unchanged.
        """
        self._check_results(rnd, results)
        used_norm = self.clipping_norm
        update_std, count_std = self._server_noise(rnd, len(results))
        total = self._noisy_sum(rnd, results, update_std)
        mean = {name: t / self.expected_clients for name, t in total.items()}
        self._server_step(mean)
        self.ledger.record(self.round_event())
        unclipped = self._adapt(rnd, results, count_std)
        norms = [r.metrics.get("norm", math.nan) for r in results]
        mean_norm = float(np.mean(norms)) if norms else math.nan
        self.history.append(
            RoundRecord(rnd, len(results), used_norm, unclipped, mean_norm)
        )
        logger.info(
            "dp-fedavg round %d: %d clients, clipping norm %.4g",
            rnd,
            len(results),
            used_norm,
        )

    def server_state(self) -> tuple[StateDict, dict[str, Any]]:
        """What the server carries from round to round besides the global model and
        the ledger, for a checkpoint: the momentum tensors, and the clipping norm
        and round history as JSON-able values."""
        velocity = {} if self._velocity is None else dict(self._velocity)
        values = {
            "clipping_norm": self.clipping_norm,
            "history": [asdict(r) for r in self.history],
        }
        return velocity, values

    def load_server_state(self, velocity: StateDict, values: dict[str, Any]) -> None:
        """Restore what :meth:`server_state` returned (a restarted server)."""
        self._velocity = dict(velocity) or None
        self.clipping_norm = float(values["clipping_norm"])
        self.history = [RoundRecord(**r) for r in values["history"]]

    def _server_noise(self, rnd: int, received: int) -> tuple[float, float]:
        """What the server adds to the update sum and to the count.

        Under distributed DP the server tops up the shares of sampled clients whose
        result never arrived (dropouts), so the sum still carries the full noise:
        ``std * sqrt(missing / sampled)``.
        """
        sampled = self._sampled.get(rnd, received)
        plan = self.noise_plan(sampled)
        if NoisePlacement(self.placement) is NoisePlacement.CENTRAL or sampled == 0:
            return plan.server_update_std, plan.server_count_std
        full = self.noise_plan(0)  # the whole noise, as the server would add it
        missing = math.sqrt(max(sampled - received, 0) / sampled)
        return full.server_update_std * missing, full.server_count_std * missing

    def _check_results(self, rnd: int, results: Sequence[ClientResult]) -> None:
        for r in results:
            if r.round != rnd:
                raise UpdateError(
                    f"client {r.client_id} sent an update for round {r.round} "
                    f"during round {rnd}"
                )
            check_update(r.update, self.global_state, who=f"client {r.client_id}")
            if self.adaptive is not None and not math.isfinite(
                r.metrics.get(UNCLIPPED, math.nan)
            ):
                raise UpdateError(
                    f"client {r.client_id} must send a finite '{UNCLIPPED}' "
                    "indicator for adaptive clipping"
                )

    def _noisy_sum(
        self, rnd: int, results: Sequence[ClientResult], server_std: float
    ) -> StateDict:
        total = {
            name: torch.zeros_like(t, dtype=torch.float64)
            for name, t in self.global_state.items()
        }
        central = NoisePlacement(self.placement) is NoisePlacement.CENTRAL
        for r in results:
            # A trusted server re-clips, so a client that skipped clipping cannot
            # raise its influence; under distributed DP the update is already noisy.
            update = clip_update(r.update, self.clipping_norm) if central else r.update
            for name, t in update.items():
                total[name].add_(t.to(torch.float64))
        return add_noise(total, server_std, self._noise(rnd, 0))

    def _server_step(self, mean: StateDict) -> None:
        self.global_state, self._velocity = server_step(
            self.global_state,
            mean,
            self._velocity,
            self.server_lr,
            self.server_momentum,
        )

    def _adapt(
        self, rnd: int, results: Sequence[ClientResult], server_std: float
    ) -> float:
        """Move ``S`` toward the target quantile; return the noisy unclipped
        fraction (``nan`` without adaptive clipping)."""
        if self.adaptive is None:
            return math.nan
        count = sum(r.metrics[UNCLIPPED] for r in results)
        return self._adapt_to_count(rnd, count, server_std)

    def _adapt_to_count(self, rnd: int, count: float, server_std: float) -> float:
        """Add the server's noise to the summed centred indicators ``count``, move
        ``S`` and return the noisy unclipped fraction (adaptive clipping only)."""
        assert self.adaptive is not None
        if server_std > 0:
            noise = self._noise(rnd, 1).normal(
                torch.Size([1]), server_std, torch.float64
            )
            count += float(noise)
        unclipped = count / self.expected_clients + 0.5
        self.clipping_norm = self.adaptive.next_clipping_norm(
            self.clipping_norm, unclipped
        )
        return unclipped
