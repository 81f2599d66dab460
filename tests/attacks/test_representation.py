"""The decoder attack on a split tanh CNN, with the reference Laplace perturbation."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import make_tiny
from veil.attacks import (
    invert_representations,
    laplace_perturbation,
    mlp_decoder,
    psnr,
    train_decoder,
)
from veil.errors import VeilError
from veil.models import build_model


def test_laplace_perturbation_clips_and_has_the_right_scale() -> None:
    rep = torch.full((2000, 50), 1.0)
    clipped = laplace_perturbation(5.0, math.inf)(rep, torch.Generator())
    assert torch.allclose(clipped.abs().sum(1), torch.full((2000,), 5.0))
    noisy = laplace_perturbation(5.0, 2.0)(rep, torch.Generator().manual_seed(0))
    noise = noisy - clipped
    # Laplace(b) has mean 0 and mean absolute value b = 2 * bound / epsilon = 5.
    assert noise.mean().item() == pytest.approx(0.0, abs=0.05)
    assert noise.abs().mean().item() == pytest.approx(5.0, rel=0.02)


def test_laplace_perturbation_refuses_bad_parameters() -> None:
    with pytest.raises(VeilError, match="epsilon must be > 0"):
        laplace_perturbation(1.0, 0.0)


def test_decoder_inverts_clean_representations_but_not_noisy_ones() -> None:
    torch.manual_seed(0)
    model = build_model("tanh-cnn").eval()
    device = model[:3]
    data = make_tiny(n_train=300, n_test=50)
    public, victims = data.train.x, data.test.x
    with torch.no_grad():
        bound = float(device(public).flatten(1).abs().sum(1).median())
    quality = {}
    for eps in (math.inf, 1.0):
        perturb = laplace_perturbation(bound, eps)
        size = device(public[:1]).numel()
        decoder = mlp_decoder(size, (1, 28, 28), hidden=64)
        decoder = train_decoder(
            device, perturb, public, epochs=6, lr=3e-3, decoder=decoder
        )
        rec = invert_representations(decoder, device, perturb, victims)
        span = float(victims.max() - victims.min())
        quality[eps] = psnr(rec, victims, data_range=span).mean().item()
    assert quality[math.inf] > quality[1.0] + 3
