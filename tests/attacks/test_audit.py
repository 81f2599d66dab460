"""The canary audit: its statistics, and that it can fail."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from veil.attacks import (
    audit_epsilon,
    clopper_pearson_upper,
    dpfedavg_canary_release,
    dpsgd_canary_release,
    epsilon_from_rates,
)
from veil.errors import PrivacyError, VeilError
from veil.privacy import DPSGDTrainer, dpsgd_epsilon

DELTA = 1e-5


def test_clopper_pearson_upper_bound() -> None:
    # Zero errors: the bound solves (1 - p)^n = alpha.
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert clopper_pearson_upper(10, 10, 0.05) == 1.0
    # Its coverage: P(Binomial(n, p) <= k) = alpha at p = the bound.
    p = clopper_pearson_upper(7, 50, 0.05)
    assert stats.binom.cdf(7, 50, p) == pytest.approx(0.05, rel=1e-6)


def test_epsilon_from_rates() -> None:
    assert epsilon_from_rates(0.5, 0.5, 0.0) == 0.0
    assert epsilon_from_rates(0.01, 0.1, 0.0) == pytest.approx(math.log(90))
    assert epsilon_from_rates(0.1, 0.01, 0.0) == pytest.approx(math.log(90))
    assert epsilon_from_rates(0.0, 0.5, 0.0) == math.inf


def _gaussian(sigma: float) -> object:
    def release(present: bool, g: torch.Generator) -> float:
        return float(present) + sigma * float(torch.randn((), generator=g))

    return release


def test_gaussian_mechanism_audit_is_positive_and_below_its_epsilon() -> None:
    """With 1000 runs per side left to measure, about 1 of the 4.4 is provable."""
    claimed = dpsgd_epsilon(1.0, 1.0, 1, DELTA)
    result = audit_epsilon(
        _gaussian(1.0),
        claimed_epsilon=claimed,
        delta=DELTA,
        trials=2000,  # type: ignore[arg-type]
    )
    assert result.passed
    assert 0.3 < result.epsilon_lower_bound < claimed


def _trainer(noise_multiplier: float) -> DPSGDTrainer:
    return DPSGDTrainer(
        lr=1.0,
        clipping_norm=1.0,
        noise_multiplier=noise_multiplier,
        sample_rate=1.0,
        steps=2,
    )


def test_veil_dpsgd_passes_its_audit() -> None:
    warnings.simplefilter("ignore")
    claimed = dpsgd_epsilon(2.0, 1.0, 2, DELTA)
    release = dpsgd_canary_release(_trainer(2.0))
    result = audit_epsilon(release, claimed_epsilon=claimed, delta=DELTA, trials=300)
    result.check()  # raises if the bound exceeds the claim
    assert result.epsilon_lower_bound <= claimed


def test_audit_fails_on_noise_scaled_down() -> None:
    """A mechanism claiming z = 2 but adding a tenth of that noise is caught."""
    warnings.simplefilter("ignore")
    claimed = dpsgd_epsilon(2.0, 1.0, 2, DELTA)
    release = dpsgd_canary_release(_trainer(0.2))
    result = audit_epsilon(release, claimed_epsilon=claimed, delta=DELTA, trials=300)
    assert not result.passed
    with pytest.raises(PrivacyError, match="does not deliver its guarantee"):
        result.check()


def test_dpsgd_canary_statistic_moves_by_the_clipping_norm() -> None:
    """Without noise, one full-batch step moves the statistic by sqrt(2) lr C / N
    with the canary (N = 11 examples), and not at all without it."""
    warnings.simplefilter("ignore")
    trainer = DPSGDTrainer(
        lr=1.0, clipping_norm=0.5, noise_multiplier=0.0, sample_rate=1.0, steps=1
    )
    release = dpsgd_canary_release(trainer, num_examples=10)
    g = torch.Generator().manual_seed(0)
    assert release(False, g) == 0.0
    assert release(True, g) == pytest.approx(math.sqrt(2) * 0.5 / 11, rel=1e-4)


def test_dpfedavg_canary_moves_the_model_by_s_over_q_n() -> None:
    """Without noise, veil's DPFedAvg moves coordinate 0 by S / (q N) with the canary
    (clipped from 10 S) and not at all without it."""
    release = dpfedavg_canary_release(
        noise_multiplier=0.0, sample_rate=1.0, rounds=1, clipping_norm=0.5
    )
    g = torch.Generator().manual_seed(0)
    assert release(True, g) == pytest.approx(0.5 / 5, rel=1e-6)
    assert release(False, g) == 0.0


@pytest.mark.parametrize("placement", ["central", "distributed"])
def test_veil_dpfedavg_passes_and_less_noise_fails(placement: str) -> None:
    claimed = dpsgd_epsilon(2.0, 1.0, 1, DELTA)
    honest = dpfedavg_canary_release(
        noise_multiplier=2.0, sample_rate=1.0, rounds=1, placement=placement
    )
    assert audit_epsilon(
        honest, claimed_epsilon=claimed, delta=DELTA, trials=250
    ).passed
    broken = dpfedavg_canary_release(
        noise_multiplier=0.2, sample_rate=1.0, rounds=1, placement=placement
    )
    assert not audit_epsilon(
        broken, claimed_epsilon=claimed, delta=DELTA, trials=250
    ).passed


def test_audit_catches_noise_scaled_down_inside_veils_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in veil's noise (every draw a tenth of its standard deviation) makes
    DP-FedAvg and DP-SGD fail their audits at the epsilon they still claim."""
    from veil.privacy import GeneratorNoise

    normal, fill_normal = GeneratorNoise.normal, GeneratorNoise.fill_normal

    def quiet(self: GeneratorNoise, shape: torch.Size, std: float, dtype: torch.dtype):  # type: ignore[no-untyped-def]
        return normal(self, shape, std / 10, dtype)

    def quiet_fill(self: GeneratorNoise, out: torch.Tensor, std: float):  # type: ignore[no-untyped-def]
        return fill_normal(self, out, std / 10)

    # Both ways of drawing (DP-SGD draws straight into its gradient buffers).
    monkeypatch.setattr(GeneratorNoise, "normal", quiet)
    monkeypatch.setattr(GeneratorNoise, "fill_normal", quiet_fill)
    warnings.simplefilter("ignore")
    claimed = dpsgd_epsilon(2.0, 1.0, 1, DELTA)
    fedavg = dpfedavg_canary_release(noise_multiplier=2.0, sample_rate=1.0, rounds=1)
    result = audit_epsilon(fedavg, claimed_epsilon=claimed, delta=DELTA, trials=250)
    with pytest.raises(PrivacyError, match="does not deliver its guarantee"):
        result.check()
    claimed = dpsgd_epsilon(2.0, 1.0, 2, DELTA)
    dpsgd = dpsgd_canary_release(_trainer(2.0))
    result = audit_epsilon(dpsgd, claimed_epsilon=claimed, delta=DELTA, trials=300)
    assert not result.passed


def test_audit_refuses_an_expected_batch_size_and_few_trials() -> None:
    trainer = DPSGDTrainer(
        lr=1.0, clipping_norm=1.0, noise_multiplier=1.0, expected_batch_size=2
    )
    with pytest.raises(VeilError, match="must set sample_rate"):
        dpsgd_canary_release(trainer)
    with pytest.raises(VeilError, match="trials must be >= 4"):
        audit_epsilon(_gaussian(1.0), claimed_epsilon=1.0, delta=DELTA, trials=2)  # type: ignore[arg-type]


def test_no_false_alarm_over_seeds() -> None:
    """At 95% confidence an honest Gaussian mechanism is refuted in few seeds."""
    claimed = dpsgd_epsilon(1.0, 1.0, 1, DELTA)
    refuted = [
        not audit_epsilon(
            _gaussian(1.0),  # type: ignore[arg-type]
            claimed_epsilon=claimed,
            delta=DELTA,
            trials=200,
            seed=s,
        ).passed
        for s in range(20)
    ]
    assert np.sum(refuted) <= 2
