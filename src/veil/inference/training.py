"""Training both parts of a split model, and noisy training of the cloud part.

ARDEN's recipe, as plain PyTorch with no I/O:

1. :func:`pretrain` trains the whole model ``device part -> L1Bound -> cloud part``
   on public data without noise. The device part is then frozen: it is what ships to
   phones. The cloud part it leaves is the *plainly trained* cloud part.
2. :func:`train_cloud` is *noisy training*: the cloud part is trained (here
   fine-tuned from the plain one) on perturbed representations, bound, nullified and
   Laplace-noised exactly as a device would send them, of the raw training inputs and
   of augmented ones. ``augmented_fraction`` is the mix: the expected fraction of each
   batch replaced by augmented inputs (ARDEN feeds both). The device part is frozen,
   so the representations are computed once (:meth:`Representations.compute`: the
   raw inputs and ``augmented_copies`` augmented copies of each) and only the
   nullification and the noise are drawn afresh at every step; :func:`fit_cloud`
   trains on such a precomputed pool (``veil infer train`` shares one pool among all
   its epsilons).
3. :func:`evaluate_split` measures accuracy with the perturbation a device applies.

Augmentations (plain torch, no torchvision): :func:`affine_augment` (random rotation
and shift of images, via ``affine_grid``/``grid_sample``) and :func:`swap_augment`
(tabular: each feature replaced, with probability ``rate``, by the same feature of
another example of the batch).

The noise added during training protects nothing (the training data is the cloud
provider's own); it is drawn from a seeded generator so runs are reproducible.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from veil.errors import ConfigError
from veil.inference.perturb import Perturbation

__all__ = [
    "Augment",
    "FitSettings",
    "Representations",
    "affine_augment",
    "evaluate_split",
    "fit_cloud",
    "pretrain",
    "swap_augment",
    "train_cloud",
]

logger = logging.getLogger(__name__)

#: An augmentation: ``(inputs, generator) -> inputs of the same shape``.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class FitSettings:
    """Optimiser settings of one training stage (Adam, cross-entropy).

    Attributes:
        epochs: passes over the training set, >= 1.
        lr: Adam learning rate, > 0.
        batch_size: examples per step, >= 1.
        lr_schedule: ``"constant"``, or ``"cosine"``: the learning rate decays
            from ``lr`` to 0 over all steps (cosine annealing, stepped per batch).
    """

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 128
    lr_schedule: Literal["constant", "cosine"] = "constant"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(
                "epochs and batch_size must be >= 1 and lr > 0, got "
                f"{self.epochs}, {self.batch_size} and {self.lr}"
            )
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )


def affine_augment(
    rotation: float = 15.0, shift: float = 0.1
) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Random rotations and shifts of images ``(N, C, H, W)``.

    Args:
        rotation: largest rotation, in degrees, >= 0 (uniform in ``[-r, r]``).
        shift: largest shift along each axis, as a fraction of the image side,
            in [0, 1) (uniform in ``[-s, s]``).

    Returns:
        The augmentation. Pixels moved in from outside take each image's minimum
        value (the background of standardised digits).
    """
    if rotation < 0 or not 0 <= shift < 1:
        raise ConfigError(
            f"rotation must be >= 0 and shift in [0, 1), got {rotation} and {shift}"
        )

    def apply(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(x)
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(rotation)
        moves = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * shift)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([cos, -sin, moves[:, 0]], 1),
                torch.stack([sin, cos, moves[:, 1]], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        background = x.flatten(1).amin(1).view(n, *([1] * (x.dim() - 1)))
        moved = F.grid_sample(x - background, grid, align_corners=False)
        return moved + background

    return apply


def swap_augment(rate: float = 0.1) -> Augment:
    """Tabular swap noise: each feature of ``(N, F)`` inputs is replaced, with
    probability ``rate`` in [0, 1], by the same feature of a random other example."""
    if not 0 <= rate <= 1:
        raise ConfigError(f"swap rate must be in [0, 1], got {rate}")

    def apply(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        donors = torch.randint(0, len(x), x.shape, generator=generator)
        swapped = torch.gather(x, 0, donors)
        chosen = torch.rand(x.shape, generator=generator) < rate
        return torch.where(chosen, swapped, x)

    return apply


def _fit(
    model: nn.Module,
    batches: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    n: int,
    settings: FitSettings,
    generator: torch.Generator,
    stage: str,
) -> None:
    """Adam over ``settings.epochs`` shuffled passes; ``batches(idx)`` gives the
    (input to ``model``, labels) of the examples at ``idx``."""
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=settings.lr
    )
    steps = settings.epochs * math.ceil(n / settings.batch_size)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        if settings.lr_schedule == "cosine"
        else None
    )
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, settings.batch_size):
            inputs, labels = batches(order[start : start + settings.batch_size])
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            total += float(loss.detach()) * len(labels)
        logger.info("%s: epoch %d, train loss %.4f", stage, epoch, total / n)


def pretrain(
    device_part: nn.Module,
    cloud_part: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: FitSettings,
    generator: torch.Generator,
) -> None:
    """Train ``device_part`` (ending in its ``L1Bound``) and ``cloud_part`` together
    on public data ``(x, y)``, without noise, then freeze ``device_part``."""
    whole = nn.Sequential(device_part, cloud_part)
    _fit(whole, lambda idx: (x[idx], y[idx]), len(y), settings, generator, "pretrain")
    device_part.eval().requires_grad_(False)


@dataclass(frozen=True)
class Representations:
    """Representations of the training inputs by a frozen device part.

    Attributes:
        raw: ``device_part(x)`` flattened, shape ``(N, d)``.
        augmented: ``device_part(augment(x))`` flattened, one ``(N, d)`` tensor per
            augmented copy of the inputs (empty without augmentation).
    """

    raw: torch.Tensor
    augmented: tuple[torch.Tensor, ...] = ()

    @classmethod
    @torch.no_grad()
    def compute(
        cls,
        device_part: nn.Module,
        x: torch.Tensor,
        generator: torch.Generator,
        augment: Augment | None = None,
        copies: int = 4,
        batch_size: int = 1000,
    ) -> Representations:
        """Run the frozen ``device_part`` over ``x`` and ``copies`` augmented
        copies of it (none when ``augment`` is ``None``); ``copies`` >= 1."""
        if copies < 1:
            raise ConfigError(f"augmented_copies must be >= 1, got {copies}")
        device_part.eval()

        def run(inputs: torch.Tensor) -> torch.Tensor:
            parts = [
                device_part(inputs[i : i + batch_size]).flatten(1)
                for i in range(0, len(inputs), batch_size)
            ]
            return torch.cat(parts)

        augmented: list[torch.Tensor] = []
        if augment is not None:
            for _ in range(copies):
                augmented.append(
                    torch.cat(
                        [
                            run(augment(x[i : i + batch_size], generator))
                            for i in range(0, len(x), batch_size)
                        ]
                    )
                )
        return cls(run(x), tuple(augmented))


def train_cloud(
    device_part: nn.Module,
    cloud_part: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    perturbation: Perturbation,
    settings: FitSettings,
    generator: torch.Generator,
    augment: Augment | None = None,
    augmented_fraction: float = 0.5,
    augmented_copies: int = 4,
) -> None:
    """Noisy training: train ``cloud_part`` in place on perturbed representations.

    Args:
        device_part: the frozen device part (not changed).
        cloud_part: the cloud part to train (typically a copy of the plain one).
        x, y: training inputs ``(N, ...)`` and labels ``(N,)``.
        perturbation: applied to every representation, as on a device.
        settings: optimiser settings.
        generator: batch order, augmentation, nullification and noise.
        augment: the augmentation, or ``None`` to train on raw inputs only.
        augmented_fraction: the mix, in [0, 1]: each example of a batch is
            replaced by an augmented version with this probability.
        augmented_copies: augmented versions made of each input, >= 1 (the
            representations are computed once; see :class:`Representations`).
    """
    _check_mix(augmented_fraction)
    pool = Representations.compute(device_part, x, generator, augment, augmented_copies)
    fit_cloud(
        cloud_part, pool, y, perturbation, settings, generator, augmented_fraction
    )


def fit_cloud(
    cloud_part: nn.Module,
    pool: Representations,
    y: torch.Tensor,
    perturbation: Perturbation,
    settings: FitSettings,
    generator: torch.Generator,
    augmented_fraction: float = 0.5,
) -> None:
    """Noisy training on precomputed representations (see :func:`train_cloud`).

    Each example of a batch is, with probability ``augmented_fraction``, replaced
    by one of its augmented copies in ``pool`` (chosen uniformly), then bounded,
    nullified and noised by ``perturbation`` with fresh randomness from
    ``generator`` at every step.
    """
    _check_mix(augmented_fraction)
    copies = torch.stack(pool.augmented) if pool.augmented else None

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = pool.raw[idx]
        if copies is not None and augmented_fraction > 0:
            chosen = torch.rand(len(idx), generator=generator) < augmented_fraction
            which = torch.randint(0, len(copies), (len(idx),), generator=generator)
            r = torch.where(chosen[:, None], copies[which, idx], r)
        return perturbation(r, generator), y[idx]

    stage = f"noisy training (epsilon {perturbation.epsilon:g})"
    _fit(cloud_part, batch, len(y), settings, generator, stage)


def _check_mix(augmented_fraction: float) -> None:
    if not 0 <= augmented_fraction <= 1:
        raise ConfigError(
            f"augmented_fraction must be in [0, 1], got {augmented_fraction}"
        )


@torch.no_grad()
def evaluate_split(
    device_part: nn.Module,
    cloud_part: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    perturbation: Perturbation | None,
    generator: torch.Generator,
    batch_size: int = 1000,
) -> float:
    """Accuracy (in [0, 1]) of ``cloud_part(perturb(device_part(x)))`` on ``(x, y)``;
    ``perturbation=None`` measures the split model without privacy."""
    device_part.eval()
    cloud_part.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        r = device_part(x[start : start + batch_size]).flatten(1)
        if perturbation is not None:
            r = perturbation(r, generator)
        logits = cloud_part(r)
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    return correct / max(len(y), 1)
