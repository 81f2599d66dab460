"""Gradient inversion: rebuilding a client's examples from what it uploads.

The attacker holds the global model the client started from and one
:class:`~veil.attacks.ObservedUpdate`. It searches for inputs (and labels) whose
gradient, computed exactly as the victim computed it, matches the observation:

- ``dlg`` (Zhu, Liu and Han 2019, "Deep leakage from gradients"): inputs and soft
  labels are optimised together;
- ``idlg`` (Zhao, Mopuri and Bilen 2020): the labels are read from the gradient of the
  last fully connected layer first, then only the inputs are optimised. For one
  example with cross-entropy, the bias gradient of that layer is ``softmax - onehot``,
  negative exactly at the true label. For ``1 < B <= classes`` examples the ``B``
  most negative entries are taken, which is right when the labels are distinct.

Matching is ``euclidean`` (the squared distance of DLG, which needs the attacker's
model of the release to be exact: same loss, same reduction, same scale) or
``cosine`` (one minus cosine similarity, Geiping et al. 2020, blind to the scale).
Only released coordinates are compared (a sparse DSSGD upload hides the rest).
An attacker facing DP-SGD mirrors its per-example clipping with ``clipping_norm``.

:func:`analytic_first_layer` needs no search: for one example through a first fully
connected layer with bias, row ``j`` of the weight gradient is the input times the
bias gradient ``j`` (Phong et al. 2017 showed it against distributed selective SGD),
so the input is read off any row whose weight and bias coordinates were released.

Refused: ``idlg`` with more examples than classes (labels then repeat and cannot be
read from the gradient; use ``dlg``, which optimises them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from veil.attacks.views import ObservedUpdate
from veil.errors import VeilError

__all__ = [
    "InversionConfig",
    "Reconstruction",
    "analytic_first_layer",
    "infer_labels",
    "invert_gradients",
    "last_linear",
]

logger = logging.getLogger(__name__)

Method = Literal["dlg", "idlg"]
Match = Literal["euclidean", "cosine"]


@dataclass(frozen=True)
class InversionConfig:
    """How the attacker searches.

    Attributes:
        method: ``"idlg"`` (labels read from the gradient) or ``"dlg"`` (labels
            optimised); default ``"idlg"``.
        match: ``"euclidean"`` or ``"cosine"``; default ``"euclidean"``.
        reduction: the victim's loss reduction over its batch, ``"mean"`` (veil's
            trainers) or ``"sum"``; default ``"mean"``.
        gradient_scale: the release is this times the (clipped) gradient: ``1`` for
            a gradient, ``-lr`` for a one-step SGD delta, ``1 / expected_batch_size``
            for a DP-SGD step. Ignored by ``cosine``. Default 1.
        clipping_norm: mirror DP-SGD's per-example clipping to this L2 norm, or
            ``None`` (default) for none.
        optimizer: ``"lbfgs"`` (DLG's choice, default) or ``"adam"``.
        iterations: optimiser steps, >= 1; default 100 (each L-BFGS step runs up to
            20 evaluations).
        lr: optimiser learning rate, > 0; default 1 (L-BFGS); use about 0.1 for Adam.
        restarts: independent random starts, >= 1; the one with the lowest matching
            loss is kept (the attacker cannot see the truth). Default 1.
        input_bounds: ``(low, high)`` clamp for the inputs after every step, in model
            input units, or ``None``; default ``None``.
        tv_weight: weight of a total-variation prior on image inputs, >= 0; default 0.
    """

    method: Method = "idlg"
    match: Match = "euclidean"
    reduction: Literal["mean", "sum"] = "mean"
    gradient_scale: float = 1.0
    clipping_norm: float | None = None
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    iterations: int = 100
    lr: float = 1.0
    restarts: int = 1
    input_bounds: tuple[float, float] | None = None
    tv_weight: float = 0.0

    def __post_init__(self) -> None:
        choices = {
            "method": ("dlg", "idlg"),
            "match": ("euclidean", "cosine"),
            "reduction": ("mean", "sum"),
            "optimizer": ("lbfgs", "adam"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise VeilError(
                    f"{key} must be one of {list(allowed)}, got {getattr(self, key)!r}"
                )
        if self.iterations < 1 or self.restarts < 1:
            raise VeilError(
                "iterations and restarts must be >= 1, got "
                f"{self.iterations} and {self.restarts}"
            )
        if not self.lr > 0 or not self.tv_weight >= 0:
            raise VeilError(
                f"lr must be > 0 and tv_weight >= 0, got {self.lr} and {self.tv_weight}"
            )
        if self.clipping_norm is not None and not self.clipping_norm > 0:
            raise VeilError(f"clipping_norm must be > 0, got {self.clipping_norm}")


@dataclass(frozen=True)
class Reconstruction:
    """The attacker's answer.

    Attributes:
        x: reconstructed inputs, shape ``(B, ...)``, in model input units.
        labels: recovered labels, shape ``(B,)``.
        match_loss: final matching loss of the kept restart (lower is a better fit).
    """

    x: torch.Tensor
    labels: torch.Tensor
    match_loss: float


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The name prefix and module of the model's last ``nn.Linear`` layer."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise VeilError(
            "label inference needs a final nn.Linear layer; the model has none (use "
            "method='dlg')"
        )
    return found[-1]


def infer_labels(
    model: nn.Module,
    observed: ObservedUpdate,
    batch_size: int,
    gradient_scale: float = 1.0,
) -> torch.Tensor:
    """The victim's labels read from the last linear layer's gradient (iDLG).

    Uses the bias gradient when released, else the weight gradient's row norms (the
    true class's row is the largest for one example, since ``|p_y - 1|`` equals the
    sum of the other classes' probabilities). Unreleased coordinates count as zero.
    ``gradient_scale`` is the release's scale (see :class:`InversionConfig`); only
    its sign matters here (an SGD delta is ``-lr`` times the gradient).

    Raises:
        VeilError: ``batch_size`` exceeds the number of classes, or the layer is
            missing from the observation.
    """
    prefix, layer = last_linear(model)
    classes = layer.out_features
    if not 1 <= batch_size <= classes:
        raise VeilError(
            f"batch_size must be in [1, {classes}] (the number of classes) to read "
            f"labels from the gradient, got {batch_size}; use method='dlg', which "
            "optimises labels"
        )
    bias, weight = f"{prefix}.bias", f"{prefix}.weight"
    if layer.bias is not None and bias in observed.grads:
        score = observed.grads[bias].double() * (1.0 if gradient_scale >= 0 else -1.0)
    elif weight in observed.grads:
        score = -observed.grads[weight].double().norm(dim=1)
    else:
        raise VeilError(
            f"the observed update must hold {weight!r} or {bias!r} to read labels, "
            f"got {sorted(observed.grads)}"
        )
    return torch.topk(-score, batch_size).indices.sort().values


def _release_model(
    model: nn.Module,
    names: list[str],
    x: torch.Tensor,
    targets: torch.Tensor,
    config: InversionConfig,
) -> list[torch.Tensor]:
    """The attacker's prediction of the release for candidate inputs and targets."""
    params = dict(model.named_parameters())
    plist = [params[n] for n in names]
    if config.clipping_norm is None:
        loss = F.cross_entropy(model(x), targets, reduction=config.reduction)
        grads = torch.autograd.grad(loss, plist, create_graph=True)
        return [config.gradient_scale * g for g in grads]
    # DP-SGD: each example's gradient is clipped before the sum.
    total: list[torch.Tensor] = [torch.zeros_like(p) for p in plist]
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), targets[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, plist, create_graph=True)
        norm = torch.sqrt(_sum((g * g).sum() for g in grads) + 1e-12)
        factor = torch.clamp(config.clipping_norm / norm, max=1.0)
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return [config.gradient_scale * t for t in total]


def _sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(terms)).sum()


def _match_loss(
    predicted: list[torch.Tensor],
    observed: list[torch.Tensor],
    masks: list[torch.Tensor] | None,
    match: Match,
) -> torch.Tensor:
    if masks is not None:
        predicted = [p[m] for p, m in zip(predicted, masks, strict=True)]
        observed = [o[m] for o, m in zip(observed, masks, strict=True)]
    if match == "euclidean":
        pairs = zip(predicted, observed, strict=True)
        return _sum(((p - o) ** 2).sum() for p, o in pairs)
    dot = _sum((p * o).sum() for p, o in zip(predicted, observed, strict=True))
    norm_p = torch.sqrt(_sum((p * p).sum() for p in predicted) + 1e-12)
    norm_o = torch.sqrt(_sum((o * o).sum() for o in observed) + 1e-12)
    return 1 - dot / (norm_p * norm_o)


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 4:
        return x.new_zeros(())
    dx = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    dy = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return dx + dy


def _one_start(
    model: nn.Module,
    observed: ObservedUpdate,
    shape: tuple[int, ...],
    labels: torch.Tensor | None,
    num_classes: int,
    config: InversionConfig,
    generator: torch.Generator,
) -> Reconstruction:
    """One random start of the search."""
    names = list(observed.grads)
    target = [observed.grads[n].detach() for n in names]
    masks = None if observed.known is None else [observed.known[n] for n in names]
    x = torch.randn(shape, generator=generator).requires_grad_(True)
    soft = torch.randn(shape[0], num_classes, generator=generator).requires_grad_(True)
    variables = [x] if labels is not None else [x, soft]

    if config.optimizer == "lbfgs":
        opt: torch.optim.Optimizer = torch.optim.LBFGS(
            variables, lr=config.lr, line_search_fn="strong_wolfe"
        )
    else:
        opt = torch.optim.Adam(variables, lr=config.lr)

    def objective() -> torch.Tensor:
        targets = labels if labels is not None else F.softmax(soft, dim=-1)
        predicted = _release_model(model, names, x, targets, config)
        loss = _match_loss(predicted, target, masks, config.match)
        if config.tv_weight:
            loss = loss + config.tv_weight * _total_variation(x)
        return loss

    def closure() -> float:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return float(loss.detach())

    last = x.detach().clone()
    for _ in range(config.iterations):
        opt.step(closure)
        if config.input_bounds is not None:
            with torch.no_grad():
                x.clamp_(*config.input_bounds)
        if not torch.isfinite(x).all():
            # The search diverged: answer with the last finite inputs.
            with torch.no_grad():
                x.copy_(last)
            break
        last = x.detach().clone()
    final = objective().item()
    final = final if torch.isfinite(torch.tensor(final)) else float("inf")
    found = labels if labels is not None else soft.detach().argmax(-1)
    return Reconstruction(x.detach(), found, final)


def invert_gradients(
    model: nn.Module,
    observed: ObservedUpdate,
    *,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    config: InversionConfig | None = None,
    generator: torch.Generator | None = None,
) -> Reconstruction:
    """Reconstruct the victim's batch from its observed update.

    Args:
        model: the global model the victim computed its update on; its parameters
            are read, not changed. Every name in ``observed`` must be one of its
            trainable parameters.
        observed: what the attacker sees (:mod:`veil.attacks.views`).
        input_shape: shape of one input, e.g. ``(1, 28, 28)``.
        batch_size: number of examples behind the update, >= 1.
        config: the search; default :class:`InversionConfig()` (iDLG, euclidean).
        generator: source of the random starts; default seeded with 0.

    Returns:
        The reconstruction with the lowest matching loss over the restarts.
    """
    config = config or InversionConfig()
    generator = generator or torch.Generator().manual_seed(0)
    if batch_size < 1:
        raise VeilError(f"batch_size must be >= 1, got {batch_size}")
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(observed.grads) - params)
    if unknown:
        raise VeilError(
            f"observed names must be trainable parameters of the model, got {unknown}"
        )
    shape = (batch_size, *input_shape)
    with torch.no_grad():
        num_classes = model(torch.zeros(1, *input_shape)).shape[-1]
    labels = None
    if config.method == "idlg":
        labels = infer_labels(model, observed, batch_size, config.gradient_scale)
    best: Reconstruction | None = None
    for start in range(config.restarts):
        found = _one_start(
            model, observed, shape, labels, num_classes, config, generator
        )
        logger.info("inversion start %d: match loss %.4g", start, found.match_loss)
        if best is None or found.match_loss < best.match_loss:
            best = found
    assert best is not None
    return best


def analytic_first_layer(
    model: nn.Module,
    observed: ObservedUpdate,
    input_shape: tuple[int, ...],
    fill: float = 0.0,
) -> torch.Tensor:
    """One example's input read off the first linear layer's released gradient.

    For one example, ``dL/dW[j, i] = dL/db[j] * x[i]``: each input coordinate is the
    ratio of a released weight coordinate to its row's released bias coordinate (the
    row with the largest ``|dL/db[j]|`` among those released is used; the ratio is
    blind to the release's scale and sign). Coordinates released in no usable row
    are set to ``fill``.

    Args:
        model: the global model; its first ``nn.Linear`` must take the flattened
            input (``prod(input_shape)`` features) and have a bias.
        observed: one example's release.
        input_shape: shape of one input, e.g. ``(1, 28, 28)``.
        fill: value of the coordinates that cannot be read; default 0.

    Returns:
        The input, shape ``(1, *input_shape)``.
    """
    features = 1
    for d in input_shape:
        features *= d
    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.in_features == features
    ]
    if not found or found[0][1].bias is None:
        raise VeilError(
            f"the model must start with an nn.Linear of {features} inputs and a "
            "bias for the analytic attack; use invert_gradients"
        )
    prefix = found[0][0]
    weight, bias = (
        observed.grads.get(f"{prefix}.weight"),
        observed.grads.get(f"{prefix}.bias"),
    )
    if weight is None or bias is None:
        raise VeilError(
            f"the observed update must hold {prefix}.weight and {prefix}.bias"
        )
    known_w = torch.ones_like(weight, dtype=torch.bool)
    known_b = torch.ones_like(bias, dtype=torch.bool)
    if observed.known is not None:
        known_w = observed.known[f"{prefix}.weight"]
        known_b = observed.known[f"{prefix}.bias"]
    usable = known_w & (known_b & (bias != 0))[:, None]
    strength = torch.where(usable, bias.abs()[:, None], torch.zeros(()))
    row = strength.argmax(0)  # per input coordinate, the strongest usable row
    cols = torch.arange(features)
    x = weight[row, cols].double() / bias[row].double()
    x = torch.where(usable[row, cols], x, torch.full_like(x, fill))
    return x.float().reshape(1, *input_shape)
