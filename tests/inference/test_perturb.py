"""The perturbation: bound enforced, nullification rate, Laplace scale, epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from veil.errors import PrivacyError
from veil.inference import (
    GeneratorLaplace,
    L1Bound,
    Perturbation,
    SecureLaplace,
    bound_l1,
    nullify,
)


def _l1(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).double().abs().sum(1)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    log_scale=st.floats(-8, 8),
    bound=st.floats(1e-3, 1e3),
    d=st.integers(1, 300),
)
def test_bound_is_enforced(seed: int, log_scale: float, bound: float, d: int) -> None:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(7, d, generator=g) * math.exp(log_scale)
    out = bound_l1(r, bound)
    assert bool((_l1(out) <= bound).all())
    # every example is scaled to the bound: only its length changes
    assert torch.allclose(_l1(out), torch.full((7,), bound, dtype=torch.float64))
    cos = torch.nn.functional.cosine_similarity(out.double(), r.double(), dim=1)
    assert bool((cos[_l1(r) > 0] > 1 - 1e-6).all())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), bound=st.floats(1e-2, 1e2))
def test_sensitivity_is_two_bounds(seed: int, bound: float) -> None:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 5, 3, 4, generator=g) * 100
    diff = _l1(bound_l1(a, bound) - bound_l1(b, bound))
    assert bool((diff <= 2 * bound).all())


def test_bound_layer_matches_function_and_refuses_bad_bounds() -> None:
    r = torch.randn(3, 2, 4, 4) * 10
    assert torch.equal(L1Bound(2.0)(r), bound_l1(r, 2.0))
    assert torch.equal(bound_l1(torch.zeros(2, 5), 1.0), torch.zeros(2, 5))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(PrivacyError, match="bound must be"):
            bound_l1(r, bad)


@pytest.mark.parametrize(("rate", "d"), [(0.0, 10), (0.1, 64), (0.5, 17), (0.9, 30)])
def test_nullification_zeroes_that_fraction(rate: float, d: int) -> None:
    g = torch.Generator().manual_seed(1)
    r = torch.rand(4000, d) + 1.0  # no zeros of its own
    out = nullify(r, rate, g)
    zeros = (out == 0).sum(1)
    assert bool((zeros == round(rate * d)).all())  # exactly per example
    kept = out != 0
    assert torch.equal(out[kept], r[kept])
    # each position is nullified with probability round(rate d) / d, independently
    # of its value: a chi-square test of uniformity over positions
    counts = (out == 0).sum(0).numpy()
    if counts.sum():
        assert stats.chisquare(counts).pvalue > 1e-3
        assert abs(counts.sum() / out.numel() - round(rate * d) / d) < 1e-12


def test_nullification_does_not_depend_on_the_input() -> None:
    a, b = torch.rand(50, 20) + 1, torch.rand(50, 20) + 5
    mask_a = nullify(a, 0.3, torch.Generator().manual_seed(3)) == 0
    mask_b = nullify(b, 0.3, torch.Generator().manual_seed(3)) == 0
    assert torch.equal(mask_a, mask_b)


@pytest.mark.parametrize("source", ["generator", "secure"])
@pytest.mark.parametrize(("bound", "epsilon"), [(1.0, 1.0), (0.5, 4.0), (3.0, 0.5)])
def test_laplace_scale_is_sensitivity_over_epsilon(
    source: str, bound: float, epsilon: float
) -> None:
    p = Perturbation(bound, 0.0, epsilon)
    assert p.sensitivity == 2 * bound
    assert p.scale == pytest.approx(2 * bound / epsilon)
    noise: GeneratorLaplace | SecureLaplace = SecureLaplace()
    if source == "generator":
        noise = GeneratorLaplace(torch.Generator().manual_seed(2))
    zero = torch.zeros(200, 100)
    out = p(zero, torch.Generator().manual_seed(4), noise).flatten().double().numpy()
    # Kolmogorov-Smirnov against Laplace(0, 2B/epsilon), and E|Z| = b within 5 sigma.
    # The secure source is not seeded: a threshold of 1e-6 keeps false alarms rare
    # while a wrong scale (below) still gives p-values far smaller.
    assert stats.kstest(out, "laplace", args=(0, 2 * bound / epsilon)).pvalue > 1e-6
    b = 2 * bound / epsilon
    assert abs(np.abs(out).mean() - b) < 5 * b / math.sqrt(len(out))
    # and not a Laplace of half or twice that scale
    assert stats.kstest(out, "laplace", args=(0, b / 2)).pvalue < 1e-12
    assert stats.kstest(out, "laplace", args=(0, 1.25 * b)).pvalue < 1e-12


def test_output_ratio_of_extreme_neighbours_is_within_epsilon() -> None:
    """Two inputs whose bounded representations differ by 2B in one element: the
    output's density ratio, estimated by histogram, stays within e^epsilon."""
    epsilon, bound, n = 1.0, 1.0, 400_000
    p = Perturbation(bound, 0.0, epsilon)
    g = torch.Generator().manual_seed(5)
    a = p(torch.full((n, 1), 10.0), g).numpy().ravel()  # bounded to +B
    b = p(torch.full((n, 1), -10.0), g).numpy().ravel()  # bounded to -B
    edges = np.linspace(-3, 3, 25)
    ha, _ = np.histogram(a, edges)
    hb, _ = np.histogram(b, edges)
    ratio = np.log(ha / hb)
    assert np.abs(ratio).max() <= epsilon + 0.1
    assert np.abs(ratio).max() >= epsilon - 0.1  # the bound is tight at the tails


def test_event_records_noise_multiplier_one_over_epsilon() -> None:
    event = Perturbation(2.0, 0.1, 4.0).event(3)
    assert (event.mechanism, event.count, event.sample_rate) == ("laplace", 3, 1.0)
    assert event.noise_multiplier == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("bound", "rate", "epsilon"),
    [
        (0.0, 0.1, 1.0),
        (1.0, 1.0, 1.0),
        (1.0, -0.1, 1.0),
        (1.0, 0.1, 0.0),
        (1.0, 0.1, math.inf),
    ],
)
def test_bad_parameters_are_refused(bound: float, rate: float, epsilon: float) -> None:
    with pytest.raises(PrivacyError, match="must be"):
        Perturbation(bound, rate, epsilon)
