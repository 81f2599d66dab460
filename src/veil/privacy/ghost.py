"""A faster clipped sum for models made of Linear and Conv2d layers ("ghost" engine).

The DP-SGD step needs each example's gradient *norm* and the *sum* of the clipped
gradients, not the per-example gradients themselves. For a linear layer ``out = a W^T +
b`` the gradient of example ``i`` is the outer product ``g_i a_i^T`` of the gradient
``g_i`` of its output and its input ``a_i``, so

- its squared norm is ``|g_i|^2 |a_i|^2`` (plus ``|g_i|^2`` for the bias), and
- the clipped sum is ``(c * g)^T a``, one matrix product with the clip factors ``c``,

which costs about what the ordinary backward pass costs, where materialising every
per-example gradient (:mod:`veil.privacy.grad_sample`) costs ``B`` times the model's
size in memory (Goodfellow 2015; Li et al. 2022; Bu et al. 2023). Conv2d layers are
unfolded into the same form; their per-example weight gradients are materialised
(they are small) and their norms taken directly.

This engine sees the layers through forward hooks, so it only accepts models in which
every trainable parameter belongs to a ``Linear`` or ``Conv2d`` (groups 1, zero
padding) that runs once per forward pass, and no parameter is shared between layers.
:func:`supports` says whether a model qualifies; the DP-SGD step uses this engine when
it does and ``engine="auto"`` (also when a layer turns out to run twice), and the
``torch.func`` engine otherwise. Both give the
same clipped sum up to float rounding (a test holds them to it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from veil.errors import PrivacyError
from veil.privacy.grad_sample import LossFn, check_model, trainable_parameters

__all__ = ["GhostUnsupportedError", "clipped_sum", "supports", "unsupported_reason"]

_Layer = nn.Linear | nn.Conv2d


class GhostUnsupportedError(PrivacyError):
    """The ghost engine cannot handle this model; the functional engine can."""


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the ghost engine cannot handle ``model``, or ``None`` if it can."""
    owners: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if not isinstance(module, _Layer):
                return (
                    f"trainable parameter {name}.{pname} belongs to a "
                    f"{type(module).__name__}, not a Linear or Conv2d"
                )
            if id(p) in owners:
                return f"parameter {name}.{pname} is shared with {owners[id(p)]}"
            owners[id(p)] = f"{name}.{pname}"
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1
            or module.padding_mode != "zeros"
            or isinstance(module.padding, str)
        ):
            return f"Conv2d {name} uses groups, string padding or a padding mode"
    return None


def supports(model: nn.Module) -> bool:
    """Whether :func:`clipped_sum` can handle ``model``."""
    return unsupported_reason(model) is None


def clipped_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clip: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: LossFn = F.cross_entropy,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Sum over the batch of each example's gradient times its clip factor.

    Args:
        model: a model :func:`supports` accepts; ``loss_fn`` must average over the
            batch, and no layer may mix examples.
        x: inputs, shape ``(B, ...)``, ``B >= 1``.
        y: targets, shape ``(B, ...)``.
        clip: maps the per-example gradient norms, shape ``(B,)``, to clip factors.
        loss_fn: batch-mean loss, default cross-entropy.

    Returns:
        ``(sums, norms, loss_sum)``: the clipped sum per trainable parameter name, the
        per-example gradient norms ``(B,)``, and the summed loss (a scalar tensor).
    """
    check_model(model)
    reason = unsupported_reason(model)
    if reason is not None:
        raise GhostUnsupportedError(
            f"the ghost engine cannot handle this model ({reason}); use "
            "engine='functional'"
        )
    names = {id(p): n for n, p in trainable_parameters(model).items()}
    layers = [
        m
        for m in model.modules()
        if isinstance(m, _Layer) and any(id(p) in names for p in m.parameters())
    ]
    seen: dict[_Layer, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(
        module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> None:
        if module in seen:
            raise GhostUnsupportedError(
                f"layer {type(module).__name__} runs twice in one forward pass; use "
                "engine='functional'"
            )
        assert isinstance(module, _Layer)
        seen[module] = (args[0].detach(), out)

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        total = loss_fn(model(x), y) * len(x)
    finally:
        for h in handles:
            h.remove()
    used = [m for m in layers if m in seen]
    outputs = [seen[m][1] for m in used]
    out_grads = torch.autograd.grad(total, outputs, allow_unused=True)

    # Per-example squared norms, layer by layer.
    parts: list[tuple[_Layer, torch.Tensor, torch.Tensor | None]] = []
    sq = torch.zeros(len(x), dtype=torch.float64)
    for module, g in zip(used, out_grads, strict=True):
        if g is None:
            continue
        a = seen[module][0]
        weight_part, g2 = _layer_parts(module, a, g)
        parts.append((module, g2, weight_part))
        sq += _layer_sq_norms(module, a, g2, weight_part)
    norms = sq.sqrt().to(x.dtype if x.is_floating_point() else torch.float32)
    factors = clip(norms)

    # Clipped sums.
    sums = {n: torch.zeros_like(p) for n, p in trainable_parameters(model).items()}
    for module, g2, per_example in parts:
        a = seen[module][0]
        w, b = module.weight, module.bias
        if w.requires_grad:
            if per_example is None:  # 2-D Linear: one matrix product
                sums[names[id(w)]] += (factors[:, None] * g2).T @ a
            else:
                summed = torch.tensordot(factors, per_example, dims=1)
                sums[names[id(w)]] += summed.view_as(w)
        if b is not None and b.requires_grad:
            sums[names[id(b)]] += factors @ _bias_rows(module, g2)
    return sums, norms, total.detach()


def _layer_parts(
    module: nn.Module, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(per-example weight gradients or None, output gradients)`` of one layer."""
    if isinstance(module, nn.Linear):
        if a.dim() == 2:
            return None, g
        a3, g3 = a.flatten(1, -2), g.flatten(1, -2)
        return torch.einsum("bto,bti->boi", g3, a3), g3
    assert isinstance(module, nn.Conv2d)
    unfolded = F.unfold(
        a,
        module.kernel_size,
        dilation=module.dilation,
        padding=module.padding,  # type: ignore[arg-type]
        stride=module.stride,
    )
    g3 = g.flatten(2)
    return torch.bmm(g3, unfolded.transpose(1, 2)), g3


def _bias_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Each example's bias gradient, shape ``(B, out)``, from the output gradients as
    :func:`_layer_parts` shapes them: ``(B, out)`` or ``(B, T, out)`` for Linear,
    ``(B, out, L)`` for Conv2d."""
    if g.dim() == 2:
        return g
    return g.sum(dim=2) if isinstance(module, nn.Conv2d) else g.sum(dim=1)


def _layer_sq_norms(
    module: nn.Module,
    a: torch.Tensor,
    g: torch.Tensor,
    per_example: torch.Tensor | None,
) -> torch.Tensor:
    """Each example's squared gradient norm over the layer's trainable parameters."""
    total = torch.zeros(len(a), dtype=torch.float64)
    w, b = module.weight, module.bias
    assert isinstance(w, torch.Tensor)
    if w.requires_grad:
        if per_example is None:
            total += (_sq_rows(g) * _sq_rows(a)).double()
        else:
            total += _sq_rows(per_example.flatten(1)).double()
    if b is not None and b.requires_grad:
        total += _sq_rows(_bias_rows(module, g)).double()
    return total


def _sq_rows(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row of a 2-D tensor, shape ``(B,)``."""
    return torch.linalg.vector_norm(t, dim=1).square()
