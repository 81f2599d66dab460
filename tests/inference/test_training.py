"""Augmentation, pretraining and noisy training on small data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.conftest import make_tiny
from veil.errors import ConfigError
from veil.inference import (
    FitSettings,
    L1Bound,
    Perturbation,
    affine_augment,
    evaluate_split,
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
