"""Gradient inversion: label recovery, the attacker's mirror of DP-SGD, the views."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from veil.attacks import (
    InversionConfig,
    ObservedUpdate,
    dpsgd_release,
    dssgd_release,
    infer_labels,
    invert_gradients,
    label_accuracy,
    plain_view,
    psnr,
)
from veil.attacks.gradient_inversion import _release_model
from veil.errors import VeilError
from veil.learning.dssgd import DSSGDSettings
from veil.models import build_model
from veil.privacy import DPSGDTrainer, GeneratorNoise, noisy_gradient


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
    trainer = DPSGDTrainer(
        lr=0.1, clipping_norm=1.0, noise_multiplier=1.0, sample_rate=1.0
    )
    release = dpsgd_release(model, x, y, trainer, torch.Generator().manual_seed(0))
    config = release.attack(match="cosine", iterations=30, input_bounds=(0.0, 1.0))
    rec = invert_gradients(
        model, release.observed, input_shape=(1, 8, 8), config=config
    )
    assert psnr(rec.x, x).item() < 15


def test_labels_are_read_from_an_sgd_step_whatever_its_sign() -> None:
    """An SGD delta is minus the gradient: the label is where the bias rose."""
    model = small_mlp()
    x, y = _example(2, 6)
    delta = ObservedUpdate(
        {n: -0.1 * g for n, g in plain_view(model, x, y).grads.items()}
    )
    assert infer_labels(model, delta, 1, gradient_scale=-0.1).tolist() == [6]


def test_matching_ignores_unreleased_coordinates() -> None:
    """Garbage in the unreleased coordinates does not change the reconstruction."""
    model = small_mlp()
    x, y = _example(3, 1)
    sparse = dssgd_release(model, x, y, DSSGDSettings(0.5), lr=0.1).observed
    assert sparse.known is not None
    garbage = {
        n: torch.where(sparse.known[n], g, torch.full_like(g, 7.0))
        for n, g in sparse.grads.items()
    }
    config = InversionConfig(iterations=3, gradient_scale=-0.1)
    a = invert_gradients(model, sparse, input_shape=(1, 8, 8), config=config)
    b = invert_gradients(
        model,
        ObservedUpdate(garbage, sparse.known),
        input_shape=(1, 8, 8),
        config=config,
    )
    assert torch.equal(a.x, b.x)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(VeilError, match="match must be one of"):
        InversionConfig(match="l1")  # type: ignore[arg-type]
    with pytest.raises(VeilError, match="known"):
        ObservedUpdate({"a": torch.ones(2)}, {"a": torch.ones(3, dtype=torch.bool)})
    model = small_mlp()
    with pytest.raises(VeilError, match="trainable parameters"):
        invert_gradients(
            model, ObservedUpdate({"nope": torch.ones(1)}), input_shape=(1, 8, 8)
        )


def test_analytic_first_layer_reads_the_input_off_a_dssgd_upload() -> None:
    """Row j of the first layer's weight gradient is x times the bias gradient j:
    the input comes back exactly from the full update and from a sparse upload."""
    from veil.attacks import analytic_first_layer, fedavg_release

    model = small_mlp()
    x, y = _example(8, 5)
    full = fedavg_release(model, x, y, lr=0.1).observed
    assert psnr(analytic_first_layer(model, full, (1, 8, 8)), x).item() > 80
    sparse = dssgd_release(model, x, y, DSSGDSettings(0.3), lr=0.1).observed
    rec = analytic_first_layer(model, sparse, (1, 8, 8), fill=-1.0)
    read = rec != -1.0
    # The largest coordinates are those of the brightest pixels: read exactly.
    assert read.float().mean() > 0.5
    assert torch.allclose(rec[read], x[read], atol=1e-4)
    assert x[read].min() >= x[~read].max()
    with pytest.raises(VeilError, match=r"nn\.Linear of 10 inputs"):
        analytic_first_layer(model, full, (1, 10))
