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
   ``noise_multiplier * clipping_norm`` to the sum (in the code the noise is drawn
   first, one parameter at a time in order, straight into the buffers the clipped
   sums are then added to in place: the same draws and the same sum, without a
   separate noise tensor or another pass over the gradient);
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from veil.errors import PrivacyError
from veil.privacy.ghost import GhostClipper, GhostUnsupportedError
from veil.privacy.grad_sample import (
    LossFn,
    check_model,
    per_example_gradients,
    trainable_parameters,
)
from veil.privacy.noise import NoiseSource

__all__ = [
    "ENGINES",
    "NoisyGradient",
    "NoisyGradientStep",
    "clip_factors",
    "noisy_gradient",
]

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

    For many steps on one model, :class:`NoisyGradientStep` gives the same result
    and checks the model once instead of at every call.

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
    step = NoisyGradientStep(
        model,
        clipping_norm=clipping_norm,
        noise_multiplier=noise_multiplier,
        noise=noise,
        max_physical_batch=max_physical_batch,
        loss_fn=loss_fn,
        engine=engine,
    )
    return step(x, y, expected_batch_size=expected_batch_size)


class NoisyGradientStep:
    """:func:`noisy_gradient` for one model, set up once for many steps.

    Setting up checks the model and, for the ghost engine, finds its layers and
    trainable parameters: a tenth of a millisecond or so, a few percent of a small
    model's step, which :class:`~veil.privacy.DPSGDTrainer` pays once per
    :meth:`~veil.privacy.DPSGDTrainer.train` call instead of every step. Each call
    gives exactly what :func:`noisy_gradient` gives with the same arguments.

    While it is in use, the model's layers and the set of its trainable parameters
    must not change (make a new one after such a change); a change of any
    parameter's ``requires_grad`` is caught at the next call and refused.

    Args:
        model: the network (no BatchNorm); its parameters are read, not changed.
        clipping_norm: largest L2 norm of one example's gradient over all trainable
            parameters, > 0.
        noise_multiplier: noise standard deviation divided by ``clipping_norm``,
            >= 0.
        noise: where the Gaussian noise comes from.
        max_physical_batch: most examples whose gradients are held in memory at
            once, >= 1; default 256.
        loss_fn: per-batch loss (mean over the batch), default cross-entropy.
        engine: ``"auto"`` (default), ``"functional"`` or ``"ghost"``, as in
            :func:`noisy_gradient`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        clipping_norm: float,
        noise_multiplier: float,
        noise: NoiseSource,
        max_physical_batch: int = 256,
        loss_fn: LossFn = F.cross_entropy,
        engine: str = "auto",
    ) -> None:
        _check_clip_and_noise(clipping_norm, noise_multiplier)
        if max_physical_batch < 1:
            raise PrivacyError(
                f"max_physical_batch must be >= 1, got {max_physical_batch}"
            )
        if engine not in ENGINES:
            raise PrivacyError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
        self._clipper = _ghost_clipper(model, engine)  # checks the model
        if self._clipper is None:
            check_model(model)
        self.params = (
            self._clipper.params
            if self._clipper is not None
            else trainable_parameters(model)
        )
        if not self.params:
            raise PrivacyError("model has no trainable parameters (requires_grad=True)")
        self.model, self.engine, self.noise, self.loss_fn = (
            model,
            engine,
            noise,
            loss_fn,
        )
        self.clipping_norm, self.noise_multiplier = clipping_norm, noise_multiplier
        self.max_physical_batch = max_physical_batch
        self._all = list(model.parameters())
        self._flags = [p.requires_grad for p in self._all]

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, *, expected_batch_size: float
    ) -> NoisyGradient:
        """One logical batch's noisy average gradient (see :func:`noisy_gradient`).

        Args:
            x: the logical batch's inputs, shape ``(B, ...)``; ``B`` may be 0.
            y: the logical batch's targets, shape ``(B, ...)``.
            expected_batch_size: ``sample_rate * N``, the divisor of the sum, > 0.
        """
        _check_expected_batch_size(expected_batch_size)
        if [p.requires_grad for p in self._all] != self._flags:
            raise PrivacyError(
                "a parameter's requires_grad changed since this NoisyGradientStep "
                "was made, so it would clip and noise the wrong parameters; make a "
                "new NoisyGradientStep after freezing or unfreezing parameters"
            )
        sums = self._noise(expected_batch_size)

        # Clip and sum, one physical micro-batch at a time. The clip factors carry
        # the division by the expected batch size, so the sums come out averaged.
        clipping_norm, scale = self.clipping_norm, 1.0 / expected_batch_size

        def factors(norms: torch.Tensor) -> torch.Tensor:
            return clip_factors(norms, clipping_norm).mul_(scale)

        loss_sum, clipped = 0.0, 0
        for xb, yb in _micro_batches(x, y, self.max_physical_batch):
            norms, losses = self._clipped_sum(xb, yb, factors, sums)
            clipped += int((norms > clipping_norm).sum())
            loss_sum += float(losses)
        return NoisyGradient(sums, len(x), loss_sum, clipped)

    def _noise(self, expected_batch_size: float) -> dict[str, torch.Tensor]:
        """New buffers holding the step's noise, one per trainable parameter.

        Noise once per logical batch: N(0, (noise_multiplier * clipping_norm)^2) on
        the sum, so divided by the expected batch size on the average. It is drawn
        straight into the buffers the clipped sums are then added to, one parameter
        at a time in order (the same draws as adding separately drawn noise).
        """
        std = self.noise_multiplier * self.clipping_norm / expected_batch_size
        sums = {
            n: torch.empty_like(p, memory_format=torch.contiguous_format)
            for n, p in self.params.items()
        }
        for buffer in sums.values():
            if std > 0:
                self.noise.fill_normal(buffer, std)
            else:
                buffer.zero_()
        return sums

    def _clipped_sum(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        factors: Callable[[torch.Tensor], torch.Tensor],
        sums: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one micro-batch's clipped sum to ``sums``; its norms and loss sum."""
        if self._clipper is not None:
            try:
                _, norms, losses = self._clipper.clipped_sum(
                    x, y, factors, self.loss_fn, out=sums
                )
                return norms, losses
            except GhostUnsupportedError:  # found on the autograd graph
                if self.engine == "ghost":
                    raise
                self._clipper = None  # nothing was added to the sums yet
        return _functional_clipped_sum(self.model, x, y, factors, self.loss_fn, sums)


def _micro_batches(
    x: torch.Tensor, y: torch.Tensor, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` in consecutive slices of at most ``size`` examples (none if
    empty)."""
    if 0 < len(x) <= size:
        yield x, y
        return
    for start in range(0, len(x), size):
        yield x[start : start + size], y[start : start + size]


def _ghost_clipper(model: nn.Module, engine: str) -> GhostClipper | None:
    """The ghost engine for ``model``, or ``None`` for the functional engine."""
    if engine == "functional":
        return None
    try:
        return GhostClipper(model)
    except GhostUnsupportedError:
        if engine == "ghost":
            raise
        return None


def _functional_clipped_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    factors: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: LossFn,
    sums: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one micro-batch's clipped gradient sum to ``sums`` (per-example gradients
    with ``torch.func``); return the per-example norms and the loss sum."""
    grads, losses = per_example_gradients(model, x, y, loss_fn)
    flat = {name: g.reshape(len(x), -1) for name, g in grads.items()}
    norms = torch.linalg.vector_norm(torch.cat(list(flat.values()), dim=1), dim=1)
    c = factors(norms)
    for name, g in flat.items():
        sums[name].view(-1).addmv_(g.T, c)
    return norms, losses.sum()


def _check_step_args(
    clipping_norm: float, noise_multiplier: float, expected_batch_size: float
) -> None:
    _check_clip_and_noise(clipping_norm, noise_multiplier)
    _check_expected_batch_size(expected_batch_size)


def _check_clip_and_noise(clipping_norm: float, noise_multiplier: float) -> None:
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise PrivacyError(f"clipping_norm must be finite and > 0, got {clipping_norm}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise PrivacyError(
            f"noise_multiplier must be finite and >= 0, got {noise_multiplier}"
        )


def _check_expected_batch_size(expected_batch_size: float) -> None:
    if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
        raise PrivacyError(
            f"expected_batch_size must be finite and > 0, got {expected_batch_size}"
        )
