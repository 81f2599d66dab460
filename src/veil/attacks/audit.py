"""Privacy auditing: an empirical lower bound on epsilon from a canary membership test.

A mechanism is run many times on a data set with a canary and many times without
(Jagielski, Ullman and Oprea 2020; Nasr et al. 2021). Each run releases a number (here
the trained model's coordinate that only the canary moves); a threshold test guesses
"canary present". Any (epsilon, delta)-DP mechanism forces every test to satisfy

    FPR + e^eps FNR >= 1 - delta   and   FNR + e^eps FPR >= 1 - delta,

so a test with small error rates proves ``epsilon >= log((1 - delta - FNR) / FPR)``
(and the same with the roles swapped). The rates are only estimated, so this module
uses Clopper-Pearson upper confidence bounds on both: with probability at least
``confidence`` the reported lower bound is below the true epsilon of the mechanism.
The threshold is chosen on half of the runs and the rates measured on the other half,
so choosing it costs no confidence.

If the lower bound exceeds the epsilon the accountant claims, the implementation does
not deliver its guarantee: :meth:`AuditResult.check` raises. Tests feed it
deliberately broken mechanisms (noise scaled down) to show that it can fail.

Canary releases provided:

- :func:`dpsgd_canary_release`: veil's :class:`~veil.privacy.DPSGDTrainer` itself, on a
  tiny linear model whose data leaves one weight column to the canary (a worst-case
  "gradient canary": its clipped gradient always has the full clipping norm and no
  other example touches that direction);
- :func:`dpfedavg_canary_release`: veil's :class:`~veil.learning.DPFedAvg` itself
  (its sampling, clipping, noise and aggregation, central or distributed), with a
  canary client whose update has norm S in a direction no other client uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from veil.errors import PrivacyError, VeilError
from veil.learning.local import TrainStats
from veil.privacy import DPSGDTrainer

__all__ = [
    "AuditResult",
    "Release",
    "audit_epsilon",
    "clopper_pearson_upper",
    "dpfedavg_canary_release",
    "dpsgd_canary_release",
    "epsilon_from_rates",
]

#: One run of the mechanism: ``release(canary_present, generator) -> statistic``.
Release = Callable[[bool, torch.Generator], float]


def clopper_pearson_upper(errors: int, trials: int, alpha: float) -> float:
    """One-sided upper ``1 - alpha`` Clopper-Pearson bound on a rate seen as
    ``errors`` out of ``trials``."""
    if not 0 <= errors <= trials or trials < 1:
        raise VeilError(
            f"need 0 <= errors <= trials and trials >= 1, got {errors}/{trials}"
        )
    if errors == trials:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, errors + 1, trials - errors))


def epsilon_from_rates(fpr: float, fnr: float, delta: float) -> float:
    """The largest epsilon that rates ``fpr`` and ``fnr`` rule out, >= 0.

    ``max(log((1 - delta - fnr) / fpr), log((1 - delta - fpr) / fnr), 0)``.
    """

    def one(a: float, b: float) -> float:
        if 1 - delta - a <= 0:
            return 0.0
        return math.inf if b == 0 else math.log((1 - delta - a) / b)

    return max(0.0, one(fnr, fpr), one(fpr, fnr))


@dataclass(frozen=True)
class AuditResult:
    """The outcome of an audit.

    Attributes:
        epsilon_lower_bound: epsilon proven with probability >= ``confidence``.
        claimed_epsilon: what the accountant states for the mechanism.
        delta: the delta of both.
        trials: runs with the canary (as many ran without).
        threshold: the test's threshold ("canary present" when statistic > it).
        fpr: false-positive rate on the evaluation half.
        fnr: false-negative rate on the evaluation half.
        confidence: confidence level of the bound.
    """

    epsilon_lower_bound: float
    claimed_epsilon: float
    delta: float
    trials: int
    threshold: float
    fpr: float
    fnr: float
    confidence: float

    @property
    def passed(self) -> bool:
        """True when the empirical bound does not exceed the claimed epsilon."""
        return self.epsilon_lower_bound <= self.claimed_epsilon

    def check(self) -> None:
        """Raise :class:`~veil.errors.PrivacyError` if the audit refutes the claim."""
        if not self.passed:
            raise PrivacyError(
                f"the audit proves epsilon >= {self.epsilon_lower_bound:.3f} (at "
                f"{self.confidence:.0%} confidence, delta={self.delta:g}), above the "
                f"claimed epsilon {self.claimed_epsilon:.3f}: the mechanism does not "
                "deliver its guarantee; check its noise and clipping"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {**asdict(self), "passed": self.passed}


def _rates(inside: np.ndarray, outside: np.ndarray, t: float) -> tuple[int, int]:
    return int((outside > t).sum()), int((inside <= t).sum())


def _best_threshold(
    inside: np.ndarray, outside: np.ndarray, delta: float, alpha: float
) -> float:
    """The threshold whose Clopper-Pearson rates prove the most epsilon here."""
    candidates = np.unique(np.concatenate([inside, outside]))
    fp = (outside[None, :] > candidates[:, None]).sum(1)
    fn = (inside[None, :] <= candidates[:, None]).sum(1)
    fpr = _cp_upper(fp, len(outside), alpha)
    fnr = _cp_upper(fn, len(inside), alpha)
    eps = [epsilon_from_rates(a, b, delta) for a, b in zip(fpr, fnr, strict=True)]
    return float(candidates[int(np.argmax(eps))])


def _cp_upper(errors: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    bound = stats.beta.ppf(1 - alpha, errors + 1, np.maximum(trials - errors, 1))
    return np.where(errors >= trials, 1.0, bound)


def audit_epsilon(
    release: Release,
    *,
    claimed_epsilon: float,
    delta: float,
    trials: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
) -> AuditResult:
    """Run ``release`` ``2 * trials`` times with and without the canary and bound
    epsilon from below.

    Args:
        release: one run of the mechanism, returning the attacker's statistic
            (larger suggests the canary is present).
        claimed_epsilon: the accountant's epsilon for one run, >= 0.
        delta: the delta at which it is claimed, in [0, 1).
        trials: runs with the canary, and as many without, >= 4 (half choose the
            threshold, half measure the rates).
        confidence: probability that the bound holds, in (0, 1).
        seed: seeds run ``i``'s generator as ``(seed, i)``.
    """
    if trials < 4 or not 0 < confidence < 1 or not 0 <= delta < 1:
        raise VeilError(
            "trials must be >= 4, confidence in (0, 1), delta in [0, 1); got "
            f"{trials}, {confidence}, {delta}"
        )
    runs = {
        present: np.array(
            [
                release(present, torch.Generator().manual_seed(seed * 1_000_003 + i))
                for i in range(int(present) * trials, (1 + int(present)) * trials)
            ]
        )
        for present in (False, True)
    }
    half = trials // 2
    alpha = (1 - confidence) / 2  # both rates bounded at once
    t = _best_threshold(runs[True][:half], runs[False][:half], delta, alpha)
    inside, outside = runs[True][half:], runs[False][half:]
    fp, fn = _rates(inside, outside, t)
    bound = epsilon_from_rates(
        clopper_pearson_upper(fp, len(outside), alpha),
        clopper_pearson_upper(fn, len(inside), alpha),
        delta,
    )
    return AuditResult(
        epsilon_lower_bound=bound,
        claimed_epsilon=claimed_epsilon,
        delta=delta,
        trials=trials,
        threshold=t,
        fpr=fp / len(outside),
        fnr=fn / len(inside),
        confidence=confidence,
    )


def _canary_data(
    num_examples: int, dim: int, canary_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed examples that never touch input 0, and a canary that only does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_examples, dim, generator=g)
    x[:, 0] = 0.0
    y = torch.randint(0, 2, (num_examples,), generator=g)
    canary = torch.zeros(1, dim)
    canary[0, 0] = canary_scale
    return x, y, canary


def dpsgd_canary_release(
    trainer: DPSGDTrainer,
    num_examples: int = 10,
    dim: int = 8,
    canary_scale: float = 100.0,
) -> Release:
    """One DP-SGD training run of ``trainer`` on a tiny data set, with or without a
    canary; the statistic is the weight difference that only the canary moves.

    The model is ``Linear(dim, 2, bias=False)`` started at zero. Every other example
    has input 0 equal to zero, so only the canary (input ``canary_scale * e_0``,
    label 0) has a gradient in the first weight column: its clipped gradient there has
    the full clipping norm along ``(-1, 1) / sqrt(2)``, the direction the statistic
    ``w[0, 0] - w[1, 0]`` reads. ``trainer`` must give ``sample_rate`` (an expected
    batch size would change the sample rate with the canary).
    """
    if trainer.sample_rate is None:
        raise VeilError(
            "the audited trainer must set sample_rate, got expected_batch_size="
            f"{trainer.expected_batch_size}; the sample rate must not depend on "
            "whether the canary is present"
        )
    trainer = replace(trainer, ledger=None)
    x, y, canary = _canary_data(num_examples, dim, canary_scale)
    with_x, with_y = torch.cat([x, canary]), torch.cat([y, torch.zeros(1).long()])

    def release(present: bool, generator: torch.Generator) -> float:
        model = nn.Linear(dim, 2, bias=False)
        nn.init.zeros_(model.weight)
        xs, ys = (with_x, with_y) if present else (x, y)
        trainer.train(model, xs, ys, generator)
        w = model.weight.detach()
        return float(w[0, 0] - w[1, 0])

    return release


class _Vector(nn.Module):
    """A "model" that is one parameter vector ``w``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))


@dataclass(frozen=True)
class _AddData:
    """A local trainer whose update is the sum of the client's data rows: each
    client's update is exactly the vector it holds."""

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> TrainStats:
        w = next(model.parameters())
        with torch.no_grad():
            w.add_(x.sum(0).to(w.dtype))
        return TrainStats(0.0, 1, len(y))


def dpfedavg_canary_release(
    *,
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    clipping_norm: float = 1.0,
    num_clients: int = 5,
    dim: int = 8,
    placement: str = "central",
) -> Release:
    """Rounds of veil's :class:`~veil.learning.DPFedAvg` with a canary client.

    Every run builds a fresh ``DPFedAvg`` (seeded from the run's generator) over
    ``num_clients`` clients and runs ``rounds`` rounds of its own
    ``configure_round`` (Poisson sampling at ``sample_rate``), ``client_fit``
    (clipping to ``clipping_norm``; under ``distributed`` placement each client adds
    its noise share) and ``aggregate`` (noise, division by ``q N``). The model is
    one vector started at zero, and each client's update is a fixed vector: the
    others' are random with coordinate 0 zero; the canary client's is ``10 S e_0``
    when present and zero when absent (a zero update adds nothing to the sum, so
    absence is removal while the population size stays public). The statistic is
    coordinate 0 of the final global model. Its accountant epsilon is DP-SGD's with
    the same noise multiplier, sample rate and rounds, at the client level.
    """
    if not (noise_multiplier >= 0 and 0 < sample_rate <= 1 and rounds >= 1):
        raise VeilError(
            "noise_multiplier must be >= 0, sample_rate in (0, 1], rounds >= 1; got "
            f"{noise_multiplier}, {sample_rate}, {rounds}"
        )
    if num_clients < 2:
        raise VeilError(f"num_clients must be >= 2, got {num_clients}")
    from veil.learning import DPFedAvg
    from veil.privacy import PrivacyLedger

    g = torch.Generator().manual_seed(0)
    others = torch.randn(num_clients, dim, generator=g)
    others[:, 0] = 0.0
    canary = torch.zeros(dim)
    canary[0] = 10 * clipping_norm
    model = _Vector(dim)

    def release(present: bool, generator: torch.Generator) -> float:
        data = others.clone()
        data[0] = canary if present else 0.0
        algorithm = DPFedAvg(
            global_state={"w": torch.zeros(dim)},
            num_clients=num_clients,
            sample_rate=sample_rate,
            clipping_norm=clipping_norm,
            noise_multiplier=noise_multiplier,
            trainer=_AddData(),
            ledger=PrivacyLedger(),
            placement=placement,
            seed=int(torch.randint(2**62, (), generator=generator)),
        )
        for rnd in range(1, rounds + 1):
            tasks = algorithm.configure_round(rnd)
            results = [
                algorithm.client_fit(t, model, data[t.client_id : t.client_id + 1], _Y)
                for t in tasks
            ]
            algorithm.aggregate(rnd, results)
        return float(algorithm.global_state["w"][0])

    return release


_Y = torch.zeros(1, dtype=torch.long)
