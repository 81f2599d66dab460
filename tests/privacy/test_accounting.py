"""Accountants: independent cross-checks, edges, and calibration.

The independent references are written here from the definitions, without
dp-accounting: the Renyi divergence of the Poisson-sampled Gaussian by numerical
integration (Mironov, Talwar and Zhang 2019, section 3), Abadi et al. (2016)'s moments
accountant conversion, and the exact (epsilon, delta) curve of the Gaussian mechanism
(Balle and Wang 2018, theorem 8).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import rdp as dpa_rdp

from veil.errors import PrivacyError
from veil.privacy import calibrate_noise_multiplier, dpsgd_epsilon, dpsgd_event

ABADI = {"noise_multiplier": 4.0, "sample_rate": 0.01, "steps": 10_000, "delta": 1e-5}


def sampled_gaussian_rdp(q: float, sigma: float, order: int) -> float:
    """RDP of one Poisson-sampled Gaussian step at ``order``, by integrating
    E_{z ~ N(0, s^2)} [((1 - q) + q * exp((2z - 1) / (2 s^2)))^order] on a fine grid
    in log space (the integrand is a Gaussian density times a power of a mixture)."""
    z = np.linspace(-40 * sigma, 40 * sigma + order / sigma, 400_001)
    log_density = -(z**2) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    log_ratio = (2 * z - 1) / (2 * sigma**2)
    log_mixture = np.logaddexp(math.log1p(-q), math.log(q) + log_ratio)
    log_f = log_density + order * log_mixture
    top = log_f.max()
    log_a = top + math.log(np.trapezoid(np.exp(log_f - top), z))
    return log_a / (order - 1)


def moments_accountant_epsilon(
    q: float, sigma: float, steps: int, delta: float
) -> float:
    """Abadi et al. (2016)'s moments accountant with lambda = order - 1 in 1..31:
    eps = min over lambda of (T * alpha(lambda) + log(1/delta)) / lambda."""
    best = math.inf
    for order in range(2, 33):
        moment = steps * sampled_gaussian_rdp(q, sigma, order) * (order - 1)
        best = min(best, (moment + math.log(1 / delta)) / (order - 1))
    return best


def gaussian_delta(epsilon: float, sigma: float) -> float:
    """Exact delta(epsilon) of the Gaussian mechanism, sensitivity 1, std sigma."""

    def phi(t: float) -> float:
        return 0.5 * math.erfc(-t / math.sqrt(2))

    return phi(1 / (2 * sigma) - epsilon * sigma) - math.exp(epsilon) * phi(
        -1 / (2 * sigma) - epsilon * sigma
    )


def gaussian_epsilon(delta: float, sigma: float) -> float:
    low, high = 0.0, 100.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (
            (low, middle) if gaussian_delta(middle, sigma) <= delta else (middle, high)
        )
    return high


def test_rdp_curve_matches_numerical_integration() -> None:
    orders = [2, 3, 5, 8, 13, 21, 32]
    acc = dpa_rdp.RdpAccountant(orders=orders)
    acc.compose(dpsgd_event(4.0, 0.01, 1))
    mine = [sampled_gaussian_rdp(0.01, 4.0, a) for a in orders]
    np.testing.assert_allclose(acc.rdp, mine, rtol=1e-6)


def test_abadi_2016_example() -> None:
    # q = 0.01, sigma = 4, delta = 1e-5, 10,000 steps: about 1.26 by the moments
    # accountant (Abadi et al. 2016, section 3.1).
    reference = moments_accountant_epsilon(0.01, 4.0, 10_000, 1e-5)
    assert reference == pytest.approx(1.26, abs=0.02)

    rdp = dpsgd_epsilon(**ABADI, accountant="rdp")
    pld = dpsgd_epsilon(**ABADI, accountant="pld")
    # RDP uses more orders and a tighter conversion than the 2016 accountant; PLD is
    # tighter still. None may be far below the reference either.
    assert pld <= rdp <= reference
    assert pld > 0.7 * reference


@pytest.mark.parametrize("sigma", [0.8, 2.0, 5.0])
def test_pld_upper_bounds_the_exact_gaussian_mechanism(sigma: float) -> None:
    exact = gaussian_epsilon(1e-5, sigma)
    pld = dpsgd_epsilon(sigma, 1.0, 1, 1e-5, accountant="pld")
    assert exact - 1e-9 <= pld <= exact + 0.02


@pytest.mark.parametrize(
    ("sigma", "q", "steps"), [(1.0, 0.01, 100), (0.7, 0.05, 50), (2.0, 0.2, 20)]
)
def test_pld_is_at_most_rdp(sigma: float, q: float, steps: int) -> None:
    pld = dpsgd_epsilon(sigma, q, steps, 1e-6, accountant="pld")
    rdp = dpsgd_epsilon(sigma, q, steps, 1e-6, accountant="rdp")
    assert 0 < pld <= rdp


def test_answers_are_pure() -> None:
    first = [dpsgd_epsilon(1.3, 0.02, 300, 1e-5, accountant=a) for a in ("pld", "rdp")]
    second = [dpsgd_epsilon(1.3, 0.02, 300, 1e-5, accountant=a) for a in ("pld", "rdp")]
    assert first == second
    z = [calibrate_noise_multiplier(2.0, 0.02, 300, 1e-5, "rdp") for _ in range(2)]
    assert z[0] == z[1]


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_edges(accountant: str) -> None:
    assert dpsgd_epsilon(0.0, 0.01, 10, 1e-5, accountant) == math.inf
    assert dpsgd_epsilon(0.0, 0.01, 0, 1e-5, accountant) == 0.0
    assert dpsgd_epsilon(1.0, 0.01, 0, 1e-5, accountant) == 0.0
    full = dpsgd_epsilon(3.0, 1.0, 10, 1e-5, accountant)
    sampled = dpsgd_epsilon(3.0, 0.5, 10, 1e-5, accountant)
    assert math.isfinite(full) and sampled < full


def test_very_many_steps() -> None:
    few = dpsgd_epsilon(4.0, 0.01, 10_000, 1e-5, "rdp")
    many = dpsgd_epsilon(4.0, 0.01, 10**9, 1e-5, "rdp")
    assert few < many < math.inf
    assert dpsgd_epsilon(4.0, 0.01, 10**6, 1e-5, "pld") <= dpsgd_epsilon(
        4.0, 0.01, 10**6, 1e-5, "rdp"
    )


def test_very_small_delta() -> None:
    tiny = dpsgd_epsilon(**{**ABADI, "delta": 1e-100}, accountant="rdp")
    assert dpsgd_epsilon(**ABADI, accountant="rdp") < tiny < math.inf
    with pytest.raises(PrivacyError, match=r"cannot resolve delta=1e-100.*'rdp'"):
        dpsgd_epsilon(**{**ABADI, "delta": 1e-100}, accountant="pld")


def test_replace_one_relation() -> None:
    add_remove = dpsgd_epsilon(1.0, 0.01, 100, 1e-5, "pld", "add_or_remove_one")
    replace = dpsgd_epsilon(1.0, 0.01, 100, 1e-5, "pld", "replace_one")
    assert add_remove < replace <= 2.2 * add_remove
    with pytest.raises(
        PrivacyError, match=r"'rdp' cannot account.*'replace_one'.*'pld'"
    ):
        dpsgd_epsilon(1.0, 0.01, 100, 1e-5, "rdp", "replace_one")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"noise_multiplier": -1.0},
            "noise_multiplier must be finite and >= 0, got -1.0",
        ),
        ({"noise_multiplier": math.nan}, "noise_multiplier must be finite"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\], got 0.0"),
        ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\], got 1.5"),
        ({"steps": -1}, "steps must be an integer >= 0, got -1"),
        ({"steps": 2.5}, "steps must be an integer >= 0, got 2.5"),
        ({"delta": 0.0}, r"delta must be in \(0, 1\), got 0.0"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
        ({"accountant": "moments"}, r"accountant must be one of \['pld', 'rdp'\]"),
        ({"relation": "swap"}, "neighbouring relation must be one of"),
    ],
)
def test_bad_inputs_are_refused(kwargs: dict, match: str) -> None:
    args = {**ABADI, "steps": 10, **kwargs}
    with pytest.raises(PrivacyError, match=match):
        dpsgd_epsilon(**args)


@pytest.mark.parametrize(
    ("target", "q", "steps", "accountant"),
    [
        (1.0, 0.01, 1000, "rdp"),
        (8.0, 0.05, 200, "rdp"),
        (0.3, 0.001, 500, "rdp"),
        (0.5, 0.02, 100, "pld"),
    ],
)
def test_calibration_round_trips_without_overshooting(
    target: float, q: float, steps: int, accountant: str
) -> None:
    tol = 1e-2
    z = calibrate_noise_multiplier(target, q, steps, 1e-5, accountant, tolerance=tol)
    assert dpsgd_epsilon(z, q, steps, 1e-5, accountant) <= target
    # ...and is not needlessly large: a little less noise exceeds the target.
    assert dpsgd_epsilon(z - 2 * tol, q, steps, 1e-5, accountant) > target


def test_calibration_edges() -> None:
    assert calibrate_noise_multiplier(1.0, 0.01, 0, 1e-5) == 0.0
    with pytest.raises(PrivacyError, match="target_epsilon must be finite and > 0"):
        calibrate_noise_multiplier(0.0, 0.01, 10, 1e-5)
    with pytest.raises(PrivacyError, match="cannot resolve delta"):
        calibrate_noise_multiplier(1.0, 0.01, 10, 1e-100, "pld")
    # A tiny target is met by a large noise multiplier, not refused.
    z = calibrate_noise_multiplier(1e-3, 1.0, 10, 1e-5, "rdp")
    assert z > 100 and dpsgd_epsilon(z, 1.0, 10, 1e-5, "rdp") <= 1e-3


def test_an_accountant_out_of_memory_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PLD's grid for a tiny noise multiplier can exceed memory (hundreds of PiB);
    # the failure is stood in for here rather than provoked.
    from dp_accounting.pld import pld_privacy_accountant

    def exhausted(self: object, *args: object, **kwargs: object) -> None:
        raise MemoryError("Unable to allocate 711. PiB")

    monkeypatch.setattr(
        pld_privacy_accountant.PLDAccountant, "_compose", exhausted, raising=False
    )
    monkeypatch.setattr(pld_privacy_accountant.PLDAccountant, "compose", exhausted)
    with pytest.raises(PrivacyError, match=r"out of memory.*accountant 'rdp'"):
        dpsgd_epsilon(1e-6, 1.0, 10, 1e-5)
