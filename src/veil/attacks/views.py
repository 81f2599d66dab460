"""What an attacker sees of one client's training: the observed update.

Gradient inversion (:mod:`veil.attacks.gradient_inversion`) works on an
:class:`ObservedUpdate`: tensors by parameter name, in gradient units, plus, for a
partial upload, a mask of the coordinates that were actually released. The functions
here build that view for each place an update can be seen in veil's data flow:

- :func:`plain_view`: the gradient of the victim's loss on its batch (a FedAvg update
  after one local SGD step is ``-lr`` times this);
- :func:`dpsgd_view`: one DP-SGD step's noisy mean gradient, computed by
  :func:`veil.privacy.noisy_gradient` itself;
- :func:`sparse_view`: a distributed selective SGD upload (Shokri and Shmatikov 2015):
  only the fraction ``theta_u`` of coordinates with the largest magnitude is sent;
- :func:`clipped_noised_view`: a DP-FedAvg contribution (McMahan et al. 2018): the
  update clipped to L2 norm ``S`` plus Gaussian noise of standard deviation ``z * S``;
- :func:`summed_view`: what the server learns under secure aggregation: only the sum
  of the round's updates.

The last three are written from the mechanisms' definitions, so that attacks can be
measured before (and independently of) veil's own DSSGD, DP-FedAvg and secure
aggregation code; feed the real released tensors through :class:`ObservedUpdate` once
those exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from veil.errors import VeilError
from veil.privacy import GeneratorNoise, noisy_gradient

__all__ = [
    "ObservedUpdate",
    "clipped_noised_view",
    "dpsgd_view",
    "plain_view",
    "sparse_view",
    "summed_view",
]

Tensors = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ObservedUpdate:
    """One upload as the attacker sees it.

    Attributes:
        grads: released values by trainable-parameter name, each shaped like the
            parameter, in the units of the attacker's model of the release (see
            ``gradient_scale`` in :class:`~veil.attacks.InversionConfig`).
        known: for a partial upload, a boolean mask per name, ``True`` where the
            coordinate was released; ``None`` (default) when every coordinate was.
            Unreleased coordinates of ``grads`` are ignored.
    """

    grads: Tensors
    known: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.grads:
            raise VeilError("an observed update must hold at least one tensor, got 0")
        if self.known is None:
            return
        if set(self.known) != set(self.grads):
            raise VeilError(
                f"known must have the names of grads {sorted(self.grads)}, got "
                f"{sorted(self.known)}"
            )
        for name, mask in self.known.items():
            if mask.shape != self.grads[name].shape or mask.dtype != torch.bool:
                raise VeilError(
                    f"known[{name!r}] must be a bool mask of shape "
                    f"{tuple(self.grads[name].shape)}, got {mask.dtype} "
                    f"{tuple(mask.shape)}"
                )

    def released_fraction(self) -> float:
        """Fraction of coordinates the attacker sees, in (0, 1]."""
        if self.known is None:
            return 1.0
        total = sum(m.numel() for m in self.known.values())
        return sum(int(m.sum()) for m in self.known.values()) / total


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def plain_view(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn | None = None,
) -> ObservedUpdate:
    """The gradient of ``loss_fn(model(x), y)`` (default: mean cross-entropy).

    Args:
        model: the global model the client starts from; not changed.
        x: the victim's batch, shape ``(B, ...)``.
        y: its labels, shape ``(B,)``.
        loss_fn: the victim's loss, reduction included.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    params = _trainable(model)
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return ObservedUpdate({n: g.detach() for n, g in zip(params, grads, strict=True)})


def dpsgd_view(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    clipping_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> ObservedUpdate:
    """One DP-SGD step's release on the victim's batch, from veil's own code.

    The clipped, summed, noised gradient divided by ``expected_batch_size``
    (:func:`veil.privacy.noisy_gradient`); an attacker mirroring it uses
    ``gradient_scale = 1 / expected_batch_size`` and the same ``clipping_norm``.
    """
    result = noisy_gradient(
        model,
        x,
        y,
        clipping_norm=clipping_norm,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        noise=GeneratorNoise(generator),
    )
    return ObservedUpdate({n: g.detach() for n, g in result.grads.items()})


def sparse_view(update: ObservedUpdate, fraction: float) -> ObservedUpdate:
    """A DSSGD upload: the ``fraction`` (theta_u) of coordinates largest in magnitude.

    Selection is over all tensors together, as in Shokri and Shmatikov (2015)'s
    "largest values" criterion; at least one coordinate is sent. The attacker learns
    the selected values and their positions; the rest are unknown (zero in ``grads``).
    """
    if not 0 < fraction <= 1:
        raise VeilError(f"fraction (theta_u) must be in (0, 1], got {fraction}")
    names = list(update.grads)
    flat = torch.cat([update.grads[n].flatten() for n in names])
    k = max(1, math.floor(fraction * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat.abs(), k).indices] = True
    grads, known, start = {}, {}, 0
    for n in names:
        size = update.grads[n].numel()
        mask = chosen[start : start + size].reshape(update.grads[n].shape)
        grads[n] = torch.where(mask, update.grads[n], torch.zeros(()))
        known[n] = mask
        start += size
    return ObservedUpdate(grads, known)


def _global_norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clipped_noised_view(
    update: ObservedUpdate,
    *,
    clipping_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> ObservedUpdate:
    """A DP-FedAvg contribution: clip to L2 norm ``S``, add N(0, (z S)^2) noise.

    This is the client's share of DP-FedAvg's noised sum as seen by an attacker who
    knows every other client's contribution (the worst case the guarantee covers).

    Args:
        update: the client's update (all coordinates known).
        clipping_norm: ``S`` > 0, the largest L2 norm of a client's update.
        noise_multiplier: ``z`` >= 0, noise standard deviation over ``S``.
        generator: source of the noise.
    """
    if not clipping_norm > 0:
        raise VeilError(f"clipping_norm must be > 0, got {clipping_norm}")
    if not noise_multiplier >= 0:
        raise VeilError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    factor = min(1.0, clipping_norm / (_global_norm(update.grads) + 1e-12))
    std = noise_multiplier * clipping_norm
    grads = {
        n: g * factor + std * torch.randn(g.shape, generator=generator, dtype=g.dtype)
        for n, g in update.grads.items()
    }
    return ObservedUpdate(grads)


def summed_view(updates: Sequence[ObservedUpdate]) -> ObservedUpdate:
    """What the server sees under secure aggregation: the sum of the updates."""
    if not updates:
        raise VeilError("summed_view needs at least one update, got 0")
    names = set(updates[0].grads)
    for u in updates:
        if set(u.grads) != names or u.known is not None:
            raise VeilError(
                "updates to sum must be complete (no known mask) and share names "
                f"{sorted(names)}, got {sorted(u.grads)}"
            )
    return ObservedUpdate(
        {n: torch.stack([u.grads[n] for u in updates]).sum(0) for n in names}
    )
