"""Augmentation, pretraining and noisy training on small data."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests.conftest import make_tiny
from veil.errors import ConfigError
from veil.inference import (
    FitSettings,
    L1Bound,
    Perturbation,
    Representations,
    affine_augment,
    evaluate_split,
    fit_cloud,
    pretrain,
    swap_augment,
    train_cloud,
)
from veil.models.split import build_split_model, split_model


def test_affine_identity_and_shape() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 28, 28)
    assert torch.allclose(affine_augment(0.0, 0.0)(x, g), x, atol=1e-5)
    moved = affine_augment(30.0, 0.2)(x, g)
    assert moved.shape == x.shape
    assert not torch.allclose(moved, x)


def test_affine_shift_moves_the_image() -> None:
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3:5, 3:5] = 1.0
    g = torch.Generator().manual_seed(1)
    moved = affine_augment(0.0, 0.25)(x, g)
    # same mass (background fill is the minimum, 0), different place
    assert moved.sum().item() == pytest.approx(4.0, abs=1.0)
    assert not torch.allclose(moved, x)


def test_swap_rate() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.arange(2000 * 30, dtype=torch.float32).reshape(2000, 30)
    out = swap_augment(0.3)(x, g)
    changed = (out != x).float().mean().item()
    assert changed == pytest.approx(0.3 * (1 - 1 / 2000), abs=0.01)
    # values come from the same column
    assert bool(((out.long() % 30) == (x.long() % 30)).all())
    with pytest.raises(ConfigError):
        swap_augment(1.5)


def test_noisy_training_beats_plain_under_perturbation() -> None:
    torch.set_num_threads(1)
    data = make_tiny(n_train=800, n_test=400)
    torch.manual_seed(0)
    device, cloud = split_model(
        build_split_model("split-mlp", (1, 28, 28), 10, features=16, hidden=64), 5
    )
    device = nn.Sequential(device, L1Bound(16.0))
    g = torch.Generator().manual_seed(0)
    pretrain(device, cloud, data.train.x, data.train.y, FitSettings(6, 3e-3, 32), g)
    assert not any(p.requires_grad for p in device.parameters())
    clean = evaluate_split(device, cloud, data.test.x, data.test.y, None, g)
    assert clean > 0.95
    # Laplace noise of scale 3.2 on 16 elements of L1 norm 16: the plain part suffers
    p = Perturbation(16.0, 0.0, 10.0)
    plain = evaluate_split(device, cloud, data.test.x, data.test.y, p, g)
    noisy = copy.deepcopy(cloud)
    frozen = copy.deepcopy(device.state_dict())
    settings = FitSettings(4, 3e-3, 32)
    augment = swap_augment(0.05)
    x, y = data.train.x, data.train.y
    train_cloud(device, noisy, x, y, p, settings, g, augment, 0.5)
    assert all(torch.equal(v, device.state_dict()[k]) for k, v in frozen.items())
    after = evaluate_split(device, noisy, data.test.x, data.test.y, p, g)
    assert after > plain + 0.05


def test_bad_mix_is_refused() -> None:
    model = build_split_model("split-mlp", (4,), 2, 2, 4)
    device, cloud = split_model(model, 5)
    with pytest.raises(ConfigError, match="augmented_fraction"):
        train_cloud(
            device,
            cloud,
            torch.zeros(2, 4),
            torch.zeros(2, dtype=torch.long),
            Perturbation(1.0, 0.0, 1.0),
            FitSettings(),
            torch.Generator(),
            None,
            2.0,
        )


def test_representations_are_computed_once_per_copy() -> None:
    x = torch.randn(30, 4)
    device = nn.Sequential(nn.Linear(4, 3), L1Bound(3.0)).requires_grad_(False)
    shift = lambda t, _g: t + 1.0  # noqa: E731  (a deterministic "augmentation")
    pool = Representations.compute(device, x, torch.Generator(), shift, 3, 7)
    assert torch.equal(pool.raw, device(x))  # batches of 7 change nothing
    assert len(pool.augmented) == 3
    for copy_ in pool.augmented:
        assert torch.equal(copy_, device(x + 1.0))
    assert Representations.compute(device, x, torch.Generator()).augmented == ()
    with pytest.raises(ConfigError, match="augmented_copies"):
        Representations.compute(device, x, torch.Generator(), shift, 0)


class _Recorder(nn.Module):
    """A cloud part that records its inputs (one trainable weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 2))
        self.seen: list[torch.Tensor] = []

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        self.seen.append(r.detach().clone())
        return r @ self.weight


def test_fit_cloud_mixes_raw_and_augmented_and_draws_fresh_noise() -> None:
    n = 4000
    raw = torch.tensor([[1.0, 0.0]]).repeat(n, 1)
    augmented = torch.tensor([[0.0, 1.0]]).repeat(n, 1)
    pool = Representations(raw, (augmented,))
    y = torch.zeros(n, dtype=torch.long)
    cloud = _Recorder()
    p = Perturbation(1.0, 0.0, 1e6)  # noise scale 2e-6: the mix stays readable
    fit_cloud(cloud, pool, y, p, FitSettings(2, 1e-3, n), torch.Generator(), 0.3)
    first, second = cloud.seen
    share = float((first[:, 1] > 0.5).float().mean())
    assert share == pytest.approx(0.3, abs=0.03)  # 5 sigma for n = 4000
    # fresh nullification and noise at every step: two epochs never see equal inputs
    assert not torch.equal(first, second)
    assert bool(((first - first.round()).abs() < 1e-4).all())


def test_cosine_schedule_decays_the_learning_rate_to_zero() -> None:
    # inputs all (1, 1) and label 0: the gradient keeps its sign, so every Adam step
    # moves a weight by about the step's learning rate (within 1%)
    pool = Representations(torch.ones(64, 2))
    y = torch.zeros(64, dtype=torch.long)
    p = Perturbation(2.0, 0.0, 1e6)
    lr, steps = 0.01, 8  # 2 epochs of 4 batches
    expected = {
        "constant": lr * steps,
        "cosine": sum(lr * (1 + math.cos(math.pi * t / steps)) / 2 for t in range(8)),
    }
    for schedule, total in expected.items():
        cloud = nn.Linear(2, 2, bias=False)
        before = cloud.weight.detach().clone()
        settings = FitSettings(2, lr, 16, schedule)  # type: ignore[arg-type]
        fit_cloud(cloud, pool, y, p, settings, torch.Generator().manual_seed(0))
        moved = float(cloud.weight.detach()[0, 0] - before[0, 0])
        assert moved == pytest.approx(total, rel=1e-2)
    with pytest.raises(ConfigError, match="lr_schedule"):
        FitSettings(lr_schedule="linear")  # type: ignore[arg-type]
