"""What an attacker sees of one client's training: the observed update.

Gradient inversion (:mod:`veil.attacks.gradient_inversion`) works on an
:class:`ObservedUpdate`: tensors by parameter name, plus, for a partial upload, a mask
of the coordinates that were actually released. :func:`plain_view` is the gradient
of the victim's loss on its batch (the textbook target of DLG). What veil's modules
release (a FedAvg update, a DP-SGD step, a DSSGD upload, a DP-FedAvg result, a secure
aggregation message) is produced by those modules themselves and decoded into an
:class:`ObservedUpdate` by :mod:`veil.attacks.releases`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from veil.errors import VeilError

__all__ = ["ObservedUpdate", "plain_view"]

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
