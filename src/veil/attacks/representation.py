"""Representation inversion: rebuilding an input from what private inference sends.

In private inference the phone runs the device part of the model, perturbs the
representation and sends it to the cloud. An attacker who knows the device part (it
ships in the app) and the perturbation (it is public) can make as many training pairs
as it likes from public data: ``perturb(device(x)) -> x``. It trains a decoder on
those pairs and applies it to what the cloud receives (He, Zhang and Lee 2019's
learning-based inversion).

The attack only needs two callables, so it plugs into any private-inference pipeline:

- ``device(x) -> representation`` (batched, no gradient needed);
- ``perturb(representation, generator) -> released representation``.

:func:`laplace_perturbation` is a simple reference perturbation (clip each
representation's L1 norm, add Laplace noise calibrated to epsilon) for testing; it is
not veil's private-inference mechanism (:mod:`veil.inference`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from veil.errors import VeilError

__all__ = [
    "Device",
    "Perturbation",
    "invert_representations",
    "laplace_perturbation",
    "mlp_decoder",
    "train_decoder",
]

Device = Callable[[torch.Tensor], torch.Tensor]
Perturbation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def laplace_perturbation(bound: float, epsilon: float) -> Perturbation:
    """Clip each representation to L1 norm ``bound``, add Laplace(2 bound / epsilon).

    Any two clipped representations are at most ``2 * bound`` apart in L1, so the
    release is ``epsilon``-DP with respect to the whole input. ``epsilon = inf``
    clips without noise.
    """
    if not bound > 0 or not epsilon > 0:
        raise VeilError(f"bound and epsilon must be > 0, got {bound} and {epsilon}")
    scale = 0.0 if math.isinf(epsilon) else 2 * bound / epsilon

    def perturb(rep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flat = rep.flatten(1)
        norms = flat.abs().sum(1, keepdim=True)
        clipped = flat * torch.clamp(bound / (norms + 1e-12), max=1.0)
        if scale > 0:
            # Inverse CDF of the Laplace distribution, in float64 so that the
            # tails stay finite.
            u = torch.rand(clipped.shape, generator=generator, dtype=torch.float64)
            u = u.clamp(min=1e-15) - 0.5
            noise = -scale * u.sign() * torch.log1p(-2 * u.abs())
            clipped = clipped + noise.to(clipped.dtype)
        return clipped.reshape(rep.shape)

    return perturb


def mlp_decoder(
    representation_size: int, input_shape: tuple[int, ...], hidden: int = 512
) -> nn.Module:
    """A two-layer decoder from a flattened representation to an input."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(representation_size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, math.prod(input_shape)),
        nn.Unflatten(1, input_shape),
    )


def _released(
    device: Device, perturb: Perturbation, x: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    with torch.no_grad():
        return perturb(device(x), generator)


def train_decoder(
    device: Device,
    perturb: Perturbation,
    public_x: torch.Tensor,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
    decoder: nn.Module | None = None,
) -> nn.Module:
    """Train a decoder from perturbed representations of ``public_x`` back to it.

    Each epoch draws fresh perturbations, as the attacker can. Mean squared error in
    model input units, Adam.

    Args:
        device: the device part, ``(B, ...) -> (B, ...)``.
        perturb: the perturbation applied on the phone.
        public_x: the attacker's own inputs, shape ``(N, ...)``, ``N >= 1``.
        epochs: passes over ``public_x``, >= 1.
        batch_size: examples per step, >= 1.
        lr: Adam learning rate, > 0.
        generator: source of batches and perturbations; default seeded with 0.
        decoder: the network to train; default :func:`mlp_decoder`.
    """
    if len(public_x) < 1 or epochs < 1 or batch_size < 1 or not lr > 0:
        raise VeilError(
            "public_x must hold >= 1 example and epochs, batch_size, lr must be "
            f"positive, got {len(public_x)}, {epochs}, {batch_size}, {lr}"
        )
    generator = generator or torch.Generator().manual_seed(0)
    if decoder is None:
        size = _released(device, perturb, public_x[:1], generator)[0].numel()
        decoder = mlp_decoder(size, tuple(public_x.shape[1:]))
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    decoder.train()
    for _ in range(epochs):
        order = torch.randperm(len(public_x), generator=generator)
        for start in range(0, len(order), batch_size):
            xb = public_x[order[start : start + batch_size]]
            loss = F.mse_loss(decoder(_released(device, perturb, xb, generator)), xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    decoder.eval()
    return decoder


@torch.no_grad()
def invert_representations(
    decoder: nn.Module,
    device: Device,
    perturb: Perturbation,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The attacker's reconstruction of the victims' ``x`` from their releases."""
    generator = generator or torch.Generator().manual_seed(1)
    return decoder(_released(device, perturb, x, generator))
