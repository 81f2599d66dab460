"""User-level DP pieces: clipping, the noise plan, adaptive clipping's arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import PrivacyError
from veil.learning import (
    AdaptiveClipping,
    NoisePlan,
    clip_update,
    combined_noise_multiplier,
    update_noise_multiplier,
    update_norm,
)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=12),
    clipping_norm=st.floats(1e-3, 1e3),
)
def test_clipped_update_is_within_the_norm_and_keeps_its_direction(
    values: list[float], clipping_norm: float
) -> None:
    update = {
        "a": torch.tensor(values[: len(values) // 2 + 1]),
        "b": torch.tensor(values),
    }
    clipped = clip_update(update, clipping_norm)
    norm = update_norm(update)
    assert update_norm(clipped) <= clipping_norm * (1 + 1e-6)
    if norm <= clipping_norm:
        assert all(torch.equal(clipped[k], update[k]) for k in update)
    else:
        factor = clipping_norm / norm
        for k in update:
            assert torch.allclose(clipped[k], update[k] * factor)


def test_norm_spans_every_tensor() -> None:
    # sqrt(3^2 + 4^2 + 12^2) = 13: the norm is over all tensors together.
    update = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([12.0])}
    assert update_norm(update) == pytest.approx(13.0)
    clipped = clip_update(update, 6.5)
    assert torch.allclose(clipped["w"], torch.tensor([1.5, 2.0]))
    assert torch.allclose(clipped["b"], torch.tensor([6.0]))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_clipping_refuses_a_bad_norm(bad: float) -> None:
    with pytest.raises(PrivacyError, match="clipping_norm must be"):
        clip_update({"w": torch.ones(2)}, bad)


@pytest.mark.parametrize("n", [1, 4, 100])
def test_distributed_shares_sum_to_the_central_variance(n: int) -> None:
    central = NoisePlan.for_round("central", 2.0, 0.5, n)
    shared = NoisePlan.for_round("distributed", 2.0, 0.5, n)
    assert (central.client_update_std, central.client_count_std) == (0.0, 0.0)
    assert (shared.server_update_std, shared.server_count_std) == (0.0, 0.0)
    # n independent shares: variances add up to the central noise's variance.
    assert n * shared.client_update_std**2 == pytest.approx(
        central.server_update_std**2
    )
    assert n * shared.client_count_std**2 == pytest.approx(central.server_count_std**2)


def test_distributed_round_without_clients_falls_back_to_the_server() -> None:
    plan = NoisePlan.for_round("distributed", 2.0, 0.5, 0)
    assert plan == NoisePlan(2.0, 0.0, 0.5, 0.0)


def test_combined_noise_multiplier_is_the_inverse_of_the_update_share() -> None:
    # Andrew et al. (2021), Theorem 1: z^-2 = z_update^-2 + (2 sigma_b)^-2.
    z, sigma_b = 1.0, 5.0
    z_update = update_noise_multiplier(z, sigma_b)
    assert z_update == pytest.approx((1 - 1 / 100) ** -0.5)
    assert combined_noise_multiplier(z_update, sigma_b) == pytest.approx(z)
    assert z_update > z  # the count takes part of the budget


def test_count_noise_too_small_is_refused() -> None:
    with pytest.raises(PrivacyError, match="count_noise_multiplier must be greater"):
        update_noise_multiplier(1.0, 0.5)


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_adaptive_clipping_converges_to_the_target_quantile(quantile: float) -> None:
    # Synthetic update norms (log-normal), 200 clients a round, a noisy count.
    rng = np.random.default_rng(0)
    clipping = AdaptiveClipping(
        count_noise_multiplier=2.0, target_quantile=quantile, learning_rate=0.2
    )
    norm, m, tail = 0.01, 200, []
    for rnd in range(600):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=m)
        count = float(np.sum(norms <= norm) - m / 2 + rng.normal(0, 2.0))
        norm = clipping.next_clipping_norm(norm, count / m + 0.5)
        if rnd >= 400:
            tail.append(norm)
    truth = float(np.exp(0.5 * _normal_quantile(quantile)))
    assert np.mean(tail) == pytest.approx(truth, rel=0.05)


def _normal_quantile(p: float) -> float:
    return math.sqrt(2) * float(torch.erfinv(torch.tensor(2 * p - 1)).item())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"count_noise_multiplier": 1.0, "target_quantile": 1.0}, "target_quantile"),
        ({"count_noise_multiplier": 1.0, "learning_rate": 0.0}, "learning_rate"),
        ({"count_noise_multiplier": 0.0}, "count_noise_multiplier"),
    ],
)
def test_adaptive_clipping_refuses_bad_settings(
    kwargs: dict[str, float], match: str
) -> None:
    with pytest.raises(PrivacyError, match=match):
        AdaptiveClipping(**kwargs)
