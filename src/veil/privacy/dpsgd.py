"""The DP-SGD step (Abadi et al. 2016): clip each example, sum, add noise, average.

Given one logical batch (a Poisson sample of the data), :func:`noisy_gradient`

1. computes every example's gradient (:mod:`veil.privacy.grad_sample`), in physical
   micro-batches of at most ``max_physical_batch`` examples so memory stays bounded;
2. scales each example's gradient, all trainable parameters taken together, to L2 norm
   at most ``clipping_norm``;

   (for models whose trainable layers are Linear and Conv layers, the ``ghost``
   engine of :mod:`veil.privacy.ghost` does steps 1 to 3 from one forward and one
   backward pass, without a second backward pass or every per-example gradient;
   ``engine="auto"`` picks it whenever the model qualifies)
3. sums the clipped gradients over the whole logical batch;
4. adds one draw of Gaussian noise with standard deviation
   ``noise_multiplier * clipping_norm`` to the sum;
5. divides by the *expected* batch size ``sample_rate * N``, not the sampled one: the
   sampled size depends on the data and would itself leak. (In the code the division
   is folded into the clip factors and the noise's standard deviation, which gives
   the same average without another pass over the gradients.)

Splitting into micro-batches changes neither the result (up to float rounding) nor the
accounting: noise is added once per logical batch, and the ledger counts logical
steps. An empty logical batch is a real step: its gradient is noise only, and it
spends privacy like any other. What the caller does with the result (an SGD update)
is post-processing and costs nothing more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from veil.errors import PrivacyError
from veil.privacy.ghost import (
    GhostUnsupportedError,
    clipped_sum,
    unsupported_reason,
)
from veil.privacy.grad_sample import (
    LossFn,
    check_model,
    per_example_gradients,
    trainable_parameters,
)
from veil.privacy.noise import NoiseSource

__all__ = ["ENGINES", "NoisyGradient", "clip_factors", "noisy_gradient"]

ENGINES = ("auto", "functional", "ghost")

# Added to the norm before dividing, so a zero gradient gets a finite factor.
_NORM_EPS = 1e-6


@dataclass(frozen=True)
class NoisyGradient:
    """The result of one DP-SGD step's gradient computation.

    Attributes:
        grads: the noisy average gradient, one tensor per trainable parameter name,
            shaped like the parameter.
        batch_size: examples in the logical batch (0 for an empty Poisson sample).
        loss_sum: sum of the examples' losses (not private: for monitoring only).
        clipped: number of examples whose gradient norm exceeded the clipping norm.
    """

    grads: dict[str, torch.Tensor]
    batch_size: int
    loss_sum: float
    clipped: int


def clip_factors(norms: torch.Tensor, clipping_norm: float) -> torch.Tensor:
    """Per-example scale ``min(1, C / (norm + 1e-6))``; scaled norms are < ``C``.

    Args:
        norms: each example's gradient L2 norm, shape ``(B,)``, >= 0.
        clipping_norm: ``C`` > 0, in the gradient's units.
    """
    return (clipping_norm / (norms + _NORM_EPS)).clamp(max=1.0)


def noisy_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    clipping_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    noise: NoiseSource,
    max_physical_batch: int = 256,
    loss_fn: LossFn = F.cross_entropy,
    engine: str = "auto",
) -> NoisyGradient:
    """Clip, sum, noise and average the per-example gradients of one logical batch.

    Args:
        model: the network (no BatchNorm); its parameters are read, not changed.
        x: the logical batch's inputs, shape ``(B, ...)``; ``B`` may be 0.
        y: the logical batch's targets, shape ``(B, ...)``.
        clipping_norm: largest L2 norm of one example's gradient over all trainable
            parameters, > 0.
        noise_multiplier: noise standard deviation divided by ``clipping_norm``,
            >= 0.
        expected_batch_size: ``sample_rate * N``, the divisor of the sum, > 0.
        noise: where the Gaussian noise comes from.
        max_physical_batch: most examples whose gradients are held in memory at
            once, >= 1; default 256. Does not change the result.
        loss_fn: per-batch loss (mean over the batch), default cross-entropy.
        engine: how clipped gradients are computed: ``"functional"`` (per-example
            gradients with ``torch.func``, any model), ``"ghost"`` (Linear and Conv
            layers only, faster, see :mod:`veil.privacy.ghost`) or ``"auto"``
            (default: ghost when the model qualifies). Same result either way.
    """
    _check_step_args(clipping_norm, noise_multiplier, expected_batch_size)
    if max_physical_batch < 1:
        raise PrivacyError(f"max_physical_batch must be >= 1, got {max_physical_batch}")
    if engine not in ENGINES:
        raise PrivacyError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    check_model(model)
    if engine == "auto" and unsupported_reason(model) is not None:
        engine = "functional"
    params = trainable_parameters(model)
    if not params:
        raise PrivacyError("model has no trainable parameters (requires_grad=True)")
    # The clip factors carry the division by the expected batch size, so the sums
    # come out averaged; the noise is scaled to match.
    scale = 1.0 / expected_batch_size
    sums = {n: torch.zeros_like(p) for n, p in params.items()} if len(x) == 0 else {}
    loss_sum = torch.zeros((), dtype=torch.float64)
    clipped = 0

    # Clip and sum, one physical micro-batch at a time.
    for start in range(0, len(x), max_physical_batch):
        xb, yb = (
            x[start : start + max_physical_batch],
            y[start : start + max_physical_batch],
        )
        parts, norms, losses = _clipped_sum(
            model, xb, yb, clipping_norm, scale, loss_fn, engine
        )
        for name, g in parts.items():
            sums[name] = sums[name].add_(g) if name in sums else g
        clipped += int((norms > clipping_norm).sum())
        loss_sum += losses.sum().to(torch.float64)

    # Noise once per logical batch: N(0, (noise_multiplier * clipping_norm)^2) on
    # the sum, so divided by the expected batch size on the average.
    std = noise_multiplier * clipping_norm * scale
    if std > 0:
        for total in sums.values():
            total.add_(noise.normal(total.shape, std, total.dtype))
    return NoisyGradient(sums, len(x), float(loss_sum), clipped)


def _clipped_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clipping_norm: float,
    scale: float,
    loss_fn: LossFn,
    engine: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Clipped gradient sum times ``scale``, per-example norms and loss sum of one
    micro-batch."""

    def factors(norms: torch.Tensor) -> torch.Tensor:
        return clip_factors(norms, clipping_norm).mul_(scale)

    if engine in ("ghost", "auto"):
        try:
            return clipped_sum(model, x, y, factors, loss_fn)
        except GhostUnsupportedError:
            if engine == "ghost":
                raise
    grads, losses = per_example_gradients(model, x, y, loss_fn)
    flat = [g.reshape(len(x), -1) for g in grads.values()]
    norms = torch.linalg.vector_norm(torch.cat(flat, dim=1), dim=1)
    c = factors(norms)
    parts = {name: torch.tensordot(c, g, dims=1) for name, g in grads.items()}
    return parts, norms, losses.sum()


def _check_step_args(
    clipping_norm: float, noise_multiplier: float, expected_batch_size: float
) -> None:
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise PrivacyError(f"clipping_norm must be finite and > 0, got {clipping_norm}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise PrivacyError(
            f"noise_multiplier must be finite and >= 0, got {noise_multiplier}"
        )
    if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
        raise PrivacyError(
            f"expected_batch_size must be finite and > 0, got {expected_batch_size}"
        )
