"""Gradient inversion: label recovery, the attacker's mirror of DP-SGD, the views."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from veil.attacks import (
    InversionConfig,
    ObservedUpdate,
    clipped_noised_view,
    dpsgd_view,
    infer_labels,
    invert_gradients,
    label_accuracy,
    plain_view,
    psnr,
    sparse_view,
    summed_view,
)
from veil.attacks.gradient_inversion import _release_model
from veil.errors import VeilError
from veil.models import build_model
from veil.privacy import GeneratorNoise, noisy_gradient


def small_mlp(bias: bool = True, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.Tanh(),
        nn.Linear(32, classes, bias=bias),
    )


def _example(seed: int, label: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor([label])


@pytest.mark.parametrize("bias", [True, False])
def test_idlg_label_is_exact_for_one_example(bias: bool) -> None:
    model = small_mlp(bias)
    for label in range(10):
        x, y = _example(label, label)
        assert infer_labels(model, plain_view(model, x, y), 1).tolist() == [label]


def test_idlg_labels_on_real_models() -> None:
    for name in ("2nn", "tanh-cnn", "cnn"):
        torch.manual_seed(1)
        model = build_model(name)
        x = torch.randn(1, 1, 28, 28)
        for label in (0, 7):
            y = torch.tensor([label])
            assert infer_labels(model, plain_view(model, x, y), 1).tolist() == [label]


def test_idlg_refuses_batches_larger_than_the_classes() -> None:
    model = small_mlp(classes=3)
    x = torch.rand(4, 1, 8, 8)
    observed = plain_view(model, x, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(VeilError, match=r"batch_size must be in \[1, 3\].*dlg"):
        invert_gradients(model, observed, input_shape=(1, 8, 8), batch_size=4)
    # DLG optimises the labels instead, and answers.
    config = InversionConfig(method="dlg", optimizer="adam", lr=0.1, iterations=5)
    rec = invert_gradients(
        model, observed, input_shape=(1, 8, 8), batch_size=4, config=config
    )
    assert rec.x.shape == (4, 1, 8, 8) and rec.labels.shape == (4,)


def test_idlg_reconstructs_an_undefended_example() -> None:
    model = small_mlp()
    x, y = _example(5, 3)
    config = InversionConfig(iterations=30, input_bounds=(0.0, 1.0))
    rec = invert_gradients(
        model, plain_view(model, x, y), input_shape=(1, 8, 8), config=config
    )
    assert label_accuracy(rec.labels, y) == 1.0
    assert psnr(rec.x, x).item() > 40


def test_dlg_recovers_label_and_image_without_reading_the_gradient() -> None:
    model = small_mlp()
    x, y = _example(6, 8)
    config = InversionConfig(method="dlg", iterations=50, input_bounds=(0.0, 1.0))
    rec = invert_gradients(
        model, plain_view(model, x, y), input_shape=(1, 8, 8), config=config
    )
    assert rec.labels.tolist() == [8]
    assert psnr(rec.x, x).item() > 25


def test_attacker_mirror_equals_veils_dpsgd_without_noise() -> None:
    """With noise 0, the attacker's model of a DP-SGD release is the release."""
    model = small_mlp()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 5
    y = torch.tensor([1, 4, 9])
    release = noisy_gradient(
        model,
        x,
        y,
        clipping_norm=0.3,
        noise_multiplier=0.0,
        expected_batch_size=3.0,
        noise=GeneratorNoise(torch.Generator()),
    )
    config = InversionConfig(clipping_norm=0.3, gradient_scale=1 / 3)
    names = list(release.grads)
    mirror = _release_model(model, names, x, y, config)
    for name, m in zip(names, mirror, strict=True):
        assert torch.allclose(m, release.grads[name], atol=1e-6)


def test_dpsgd_noise_defeats_the_attack() -> None:
    model = small_mlp()
    x, y = _example(5, 3)
    observed = dpsgd_view(
        model,
        x,
        y,
        clipping_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    config = InversionConfig(iterations=30, input_bounds=(0.0, 1.0), clipping_norm=1.0)
    rec = invert_gradients(model, observed, input_shape=(1, 8, 8), config=config)
    assert psnr(rec.x, x).item() < 15


def test_sparse_view_keeps_the_largest_fraction() -> None:
    model = small_mlp()
    plain = plain_view(model, *_example(1, 2))
    sparse = sparse_view(plain, 0.1)
    total = sum(g.numel() for g in plain.grads.values())
    assert sparse.released_fraction() == pytest.approx(int(0.1 * total) / total)
    kept = torch.cat([g[sparse.known[n]].abs() for n, g in plain.grads.items()])
    dropped = torch.cat([g[~sparse.known[n]].abs() for n, g in plain.grads.items()])
    assert kept.min() >= dropped.max()
    assert all((sparse.grads[n][~m] == 0).all() for n, m in sparse.known.items())


def test_matching_ignores_unreleased_coordinates() -> None:
    """Garbage in the unreleased coordinates does not change the reconstruction."""
    model = small_mlp()
    x, y = _example(3, 1)
    sparse = sparse_view(plain_view(model, x, y), 0.5)
    garbage = {
        n: torch.where(sparse.known[n], g, torch.full_like(g, 7.0))
        for n, g in sparse.grads.items()
    }
    config = InversionConfig(iterations=3)
    a = invert_gradients(model, sparse, input_shape=(1, 8, 8), config=config)
    b = invert_gradients(
        model,
        ObservedUpdate(garbage, sparse.known),
        input_shape=(1, 8, 8),
        config=config,
    )
    assert torch.equal(a.x, b.x)


def test_clipped_and_summed_views() -> None:
    model = small_mlp()
    ups = [plain_view(model, *_example(s, s)) for s in range(3)]
    total = summed_view(ups)
    for n in total.grads:
        assert torch.allclose(total.grads[n], sum(u.grads[n] for u in ups))
    clipped = clipped_noised_view(
        ups[0],
        clipping_norm=1e-3,
        noise_multiplier=0.0,
        generator=torch.Generator(),
    )
    norm = torch.sqrt(sum((g**2).sum() for g in clipped.grads.values()))
    assert norm.item() == pytest.approx(1e-3, rel=1e-4)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(VeilError, match="match must be one of"):
        InversionConfig(match="l1")  # type: ignore[arg-type]
    with pytest.raises(VeilError, match="fraction"):
        sparse_view(ObservedUpdate({"a": torch.ones(2)}), 0.0)
    with pytest.raises(VeilError, match="known"):
        ObservedUpdate({"a": torch.ones(2)}, {"a": torch.ones(3, dtype=torch.bool)})
    model = small_mlp()
    with pytest.raises(VeilError, match="trainable parameters"):
        invert_gradients(
            model, ObservedUpdate({"nope": torch.ones(1)}), input_shape=(1, 8, 8)
        )
