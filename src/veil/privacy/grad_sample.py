"""Per-example gradients with ``torch.func``, the first stage of a DP-SGD step.

DP-SGD bounds each example's influence by clipping that example's gradient, so it needs
one gradient per example rather than the batch's sum. This module computes them with
``torch.func``: the loss of a single example is written as a function of the
parameters (``functional_call``), differentiated (``grad``) and vectorised over the
batch (``vmap``).

What is differentiated: every parameter with ``requires_grad=True``, once. A frozen
parameter gets no per-example gradient (and so no share of the clipping norm and no
noise downstream). A parameter shared by two modules (tied weights) appears once, under
its first name, and its gradient is the sum of both uses.

A model whose layers mix the examples of a batch cannot have per-example gradients:
BatchNorm in training mode normalises each example with statistics of the others, so
one example's "gradient" depends on the whole batch and clipping it bounds nothing.
Such models are refused with :class:`~veil.errors.PrivacyError`;
:func:`veil.models.replace_batchnorm` swaps BatchNorm for GroupNorm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from veil.errors import PrivacyError

__all__ = [
    "LossFn",
    "check_model",
    "per_example_gradients",
    "trainable_parameters",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_model(model: nn.Module) -> None:
    """Refuse a model with a layer that mixes the examples of a batch.

    Raises:
        PrivacyError: naming the first such module and the fix.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise PrivacyError(
                f"module {name or '<root>'!r} ({type(module).__name__}) mixes the "
                "examples of a batch, so per-example gradients (and DP-SGD) are not "
                "defined for this model; replace it with GroupNorm, e.g. "
                "veil.models.replace_batchnorm(model)"
            )


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters DP-SGD differentiates, clips and noises, by first name.

    Parameters with ``requires_grad=False`` are left out; a tied parameter appears once.
    """
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def per_example_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = F.cross_entropy,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The gradient of each example's loss with respect to each trainable parameter.

    Args:
        model: the network; it is called on one example at a time (a batch of one),
            in its current train/eval mode. Refused if :func:`check_model` refuses it.
        x: inputs, shape ``(B, ...)`` with ``B >= 1``.
        y: targets, shape ``(B, ...)``.
        loss_fn: ``loss_fn(output, target)`` for a batch of one; default cross-entropy.

    Returns:
        ``(grads, losses)``: ``grads[name]`` has shape ``(B, *parameter.shape)`` and
        holds each example's gradient (detached); ``losses`` has shape ``(B,)``.
    """
    check_model(model)
    if len(x) == 0 or len(x) != len(y):
        raise PrivacyError(
            "x and y must hold the same number >= 1 of examples, "
            f"got {len(x)} and {len(y)}"
        )
    trainable = {n: p.detach() for n, p in trainable_parameters(model).items()}
    fixed: dict[str, torch.Tensor] = {
        n: p.detach() for n, p in model.named_parameters() if not p.requires_grad
    }
    fixed.update(dict(model.named_buffers()))

    def example_loss(
        params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, (params, fixed), (xi.unsqueeze(0),))
        loss = loss_fn(out, yi.unsqueeze(0))
        return loss, loss.detach()

    batched = vmap(
        grad(example_loss, has_aux=True),
        in_dims=(None, 0, 0),
        randomness="different",
    )
    grads, losses = batched(trainable, x, y)
    return grads, losses
