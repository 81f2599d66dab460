"""The DP-SGD step: clipping bound, micro-batching, and the noise's size."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from veil.errors import PrivacyError
from veil.privacy import (
    GeneratorNoise,
    NoisyGradientStep,
    clip_factors,
    noisy_gradient,
    per_example_gradients,
)


def flat_norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


@given(
    norms=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=20),
    clipping_norm=st.floats(1e-3, 1e3),
)
def test_clip_factors_bound_every_norm(
    norms: list[float], clipping_norm: float
) -> None:
    n = torch.tensor(norms, dtype=torch.float64)
    factors = clip_factors(n, clipping_norm)
    assert bool((factors <= 1).all())
    assert bool((n * factors <= clipping_norm).all())
    # Examples already within the bound are (almost) untouched.
    small = n <= clipping_norm / 2
    assert bool((factors[small] > 1 - 1e-5).all())


@pytest.mark.parametrize("clipping_norm", [0.01, 0.5, 100.0])
def test_each_clipped_example_has_norm_at_most_the_clipping_norm(
    clipping_norm: float,
) -> None:
    model = small_model()
    x, y = torch.randn(6, 8) * 5, torch.randint(0, 4, (6,))
    raw, _ = per_example_gradients(model, x, y)
    noise = GeneratorNoise(torch.Generator().manual_seed(0))
    for i in range(6):
        one = noisy_gradient(
            model,
            x[i : i + 1],
            y[i : i + 1],
            clipping_norm=clipping_norm,
            noise_multiplier=0.0,
            expected_batch_size=1.0,
            noise=noise,
        )
        norm = flat_norm(one.grads)
        raw_norm = flat_norm({k: v[i] for k, v in raw.items()})
        assert norm <= clipping_norm * (1 + 1e-6)
        assert norm == pytest.approx(min(raw_norm, clipping_norm), rel=1e-4)


def test_micro_batches_do_not_change_the_result() -> None:
    model = small_model()
    x, y = torch.randn(23, 8), torch.randint(0, 4, (23,))
    results = []
    for physical in (1, 5, 23, 64):
        noise = GeneratorNoise(torch.Generator().manual_seed(7))
        results.append(
            noisy_gradient(
                model,
                x,
                y,
                clipping_norm=0.3,
                noise_multiplier=1.1,
                expected_batch_size=20.0,
                noise=noise,
                max_physical_batch=physical,
            )
        )
    for other in results[1:]:
        assert other.batch_size == 23 and other.clipped == results[0].clipped
        for name, g in results[0].grads.items():
            torch.testing.assert_close(other.grads[name], g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("noise_multiplier", "clipping_norm"), [(1.0, 1.0), (2.5, 0.2)]
)
def test_noise_std_of_averaged_gradient(
    noise_multiplier: float, clipping_norm: float
) -> None:
    # Same batch, two noise draws: the difference is pure noise with twice the
    # variance of one draw. ~20,000 coordinates pin the std to about 1%.
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(100, 200))
    x, y = torch.randn(32, 100), torch.randint(0, 200, (32,))
    expected_batch = 40.0
    draws = [
        noisy_gradient(
            model,
            x,
            y,
            clipping_norm=clipping_norm,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch,
            noise=GeneratorNoise(torch.Generator().manual_seed(seed)),
        )
        for seed in (11, 12)
    ]
    diff = torch.cat(
        [(draws[0].grads[n] - draws[1].grads[n]).flatten() for n in draws[0].grads]
    )
    std = float(diff.double().std()) / math.sqrt(2)
    assert std == pytest.approx(
        noise_multiplier * clipping_norm / expected_batch, rel=0.04
    )
    assert abs(float(diff.double().mean())) < 4 * std * math.sqrt(2 / diff.numel())


def test_empty_batch_is_noise_only() -> None:
    model = nn.Sequential(nn.Linear(50, 100))
    result = noisy_gradient(
        model,
        torch.empty(0, 50),
        torch.empty(0, dtype=torch.long),
        clipping_norm=2.0,
        noise_multiplier=1.5,
        expected_batch_size=10.0,
        noise=GeneratorNoise(torch.Generator().manual_seed(3)),
    )
    assert result.batch_size == 0 and result.loss_sum == 0.0
    values = torch.cat([g.flatten() for g in result.grads.values()]).double()
    assert float(values.std()) == pytest.approx(1.5 * 2.0 / 10.0, rel=0.05)
    assert abs(float(values.mean())) < 4 * 0.3 / math.sqrt(values.numel())


def test_frozen_parameters_get_no_noise() -> None:
    model = small_model()
    model[0].weight.requires_grad_(False)
    result = noisy_gradient(
        model,
        torch.empty(0, 8),
        torch.empty(0, dtype=torch.long),
        clipping_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=1.0,
        noise=GeneratorNoise(torch.Generator().manual_seed(3)),
    )
    assert "0.weight" not in result.grads
    assert set(result.grads) == {"0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clipping_norm": 0.0}, "clipping_norm must be finite and > 0, got 0.0"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be finite and >= 0"),
        ({"expected_batch_size": 0.0}, "expected_batch_size must be finite and > 0"),
        ({"max_physical_batch": 0}, "max_physical_batch must be >= 1, got 0"),
    ],
)
def test_bad_step_arguments_are_refused(kwargs: dict[str, float], match: str) -> None:
    args: dict = {
        "clipping_norm": 1.0,
        "noise_multiplier": 1.0,
        "expected_batch_size": 1.0,
        "noise": GeneratorNoise(torch.Generator()),
    }
    args.update(kwargs)
    with pytest.raises(PrivacyError, match=match):
        noisy_gradient(small_model(), torch.randn(2, 8), torch.zeros(2).long(), **args)


@pytest.mark.parametrize("engine", ["ghost", "functional"])
def test_noise_is_one_draw_per_parameter_in_order(engine: str) -> None:
    # The noised result minus the clip-only result is exactly the noise: one draw
    # per trainable parameter, in order, of std noise_multiplier * C / expected
    # batch, from the configured generator (what the step drew before noise went
    # straight into the sums).
    model = small_model()
    x, y = torch.randn(10, 8), torch.randint(0, 4, (10,))
    args = {"clipping_norm": 0.5, "expected_batch_size": 12.5, "engine": engine}
    noisy = noisy_gradient(
        model,
        x,
        y,
        noise_multiplier=1.3,
        noise=GeneratorNoise(torch.Generator().manual_seed(9)),
        **args,
    )
    clean = noisy_gradient(
        model,
        x,
        y,
        noise_multiplier=0.0,
        noise=GeneratorNoise(torch.Generator().manual_seed(9)),
        **args,
    )
    reference = GeneratorNoise(torch.Generator().manual_seed(9))
    std = 1.3 * 0.5 / 12.5
    for name, g in noisy.grads.items():
        drawn = reference.normal(g.shape, std, g.dtype)
        torch.testing.assert_close(g - clean.grads[name], drawn, rtol=0, atol=1e-6)


@pytest.mark.parametrize("engine", ["ghost", "functional"])
def test_a_step_set_up_once_gives_what_noisy_gradient_gives(engine: str) -> None:
    model = small_model()
    args = {"clipping_norm": 0.4, "noise_multiplier": 0.8, "max_physical_batch": 4}
    step = NoisyGradientStep(
        model,
        noise=GeneratorNoise(torch.Generator().manual_seed(2)),
        engine=engine,
        **args,
    )
    reference = GeneratorNoise(torch.Generator().manual_seed(2))
    for size in (9, 0, 3):  # several micro-batches, an empty batch, one
        x, y = torch.randn(size, 8), torch.randint(0, 4, (size,))
        got = step(x, y, expected_batch_size=6.0)
        want = noisy_gradient(
            model,
            x,
            y,
            expected_batch_size=6.0,
            noise=reference,
            engine=engine,
            **args,
        )
        assert (got.batch_size, got.clipped) == (want.batch_size, want.clipped)
        assert got.loss_sum == pytest.approx(want.loss_sum, rel=1e-6)
        for name, g in want.grads.items():
            torch.testing.assert_close(got.grads[name], g, rtol=1e-6, atol=1e-7)


def test_a_step_refuses_a_changed_requires_grad() -> None:
    model = small_model()
    step = NoisyGradientStep(
        model,
        clipping_norm=1.0,
        noise_multiplier=1.0,
        noise=GeneratorNoise(torch.Generator()),
    )
    x, y = torch.randn(3, 8), torch.randint(0, 4, (3,))
    assert set(step(x, y, expected_batch_size=3.0).grads) == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    }
    model[0].weight.requires_grad_(False)
    with pytest.raises(PrivacyError, match="make a new NoisyGradientStep"):
        step(x, y, expected_batch_size=3.0)
    with pytest.raises(PrivacyError, match="expected_batch_size must be finite"):
        step(x, y, expected_batch_size=float("nan"))
