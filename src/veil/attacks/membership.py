"""Membership inference: was this example in the training set of that model?

Two attacks against a trained model, both returning one score per example (larger
means "member"), scored with :func:`veil.attacks.metrics.membership_metrics`:

- :func:`loss_threshold_scores` (Yeom et al. 2018): the negative loss. Training
  examples tend to have lower loss than unseen ones, the more so the more the model
  overfits.
- :func:`calibrated_scores` (difficulty calibration, Watson et al. 2022): how much
  more confident the target is on the example than reference models that did not
  train on it. Examples that are hard for every model no longer look like
  non-members, and easy ones no longer look like members. By default confidences are
  compared on the logit scale ``log(p / (1 - p))`` of the true class's probability
  ``p``, as in the offline attack of Carlini et al. (2022), which spreads out the
  confidences near 1 where members of an overfit model sit.

:func:`membership_report` puts the measured power beside what the model's epsilon
allows (:func:`~veil.attacks.metrics.dp_advantage_bound`,
:func:`~veil.attacks.metrics.dp_tpr_bound`): a model trained with (epsilon, delta)-DP
cannot be attacked beyond them, whatever the attack (up to sampling error of the
finite evaluation set).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from veil.attacks.metrics import (
    MembershipMetrics,
    dp_advantage_bound,
    dp_tpr_bound,
    membership_metrics,
)
from veil.errors import VeilError

__all__ = [
    "MembershipReport",
    "calibrated_scores",
    "loss_threshold_scores",
    "membership_report",
    "per_example_losses",
]


@torch.no_grad()
def per_example_losses(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> np.ndarray:
    """Cross-entropy of each example under ``model`` (in eval mode), shape ``(N,)``."""
    model.eval()
    out = [
        F.cross_entropy(
            model(x[i : i + batch_size]), y[i : i + batch_size], reduction="none"
        )
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).double().numpy()


def loss_threshold_scores(losses: np.ndarray) -> np.ndarray:
    """Yeom et al.'s score: the negative loss (members have lower loss)."""
    return -np.asarray(losses, dtype=np.float64)


def _logit_confidence(losses: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` of ``p = exp(-loss)``, stable for losses near 0."""
    losses = np.maximum(losses, 1e-12)
    return -losses - np.log(-np.expm1(-losses))


def calibrated_scores(
    target_losses: np.ndarray,
    reference_losses: np.ndarray,
    scale: Literal["logit", "loss"] = "logit",
) -> np.ndarray:
    """Difficulty-calibrated score: the target's confidence minus the references'.

    Args:
        target_losses: each example's cross-entropy under the attacked model, shape
            ``(N,)``.
        reference_losses: the same examples' losses under ``R >= 1`` reference models
            trained without them, shape ``(R, N)``.
        scale: ``"logit"`` (default) compares ``log(p / (1 - p))`` of the true
            class's probability; ``"loss"`` compares losses (mean reference loss
            minus target loss, Watson et al. 2022).
    """
    target = np.asarray(target_losses, dtype=np.float64)
    ref = np.atleast_2d(np.asarray(reference_losses, dtype=np.float64))
    if ref.shape[1:] != target.shape or len(ref) < 1:
        raise VeilError(
            f"reference_losses must have shape (R, {len(target)}) with R >= 1, got "
            f"{ref.shape}"
        )
    if scale == "loss":
        return ref.mean(axis=0) - target
    if scale != "logit":
        raise VeilError(f"scale must be 'logit' or 'loss', got {scale!r}")
    return _logit_confidence(target) - _logit_confidence(ref).mean(axis=0)


@dataclass(frozen=True)
class MembershipReport:
    """An attack's power beside the bound that the model's epsilon implies.

    Attributes:
        attack: the attack's name.
        metrics: AUC, advantage and TPR at low FPR.
        epsilon: the model's epsilon (``inf`` without DP).
        delta: the model's delta (0 without DP).
        advantage_bound: largest advantage (epsilon, delta)-DP allows.
        tpr_bound: largest TPR at ``metrics.low_fpr`` it allows.
    """

    attack: str
    metrics: MembershipMetrics
    epsilon: float
    delta: float
    advantage_bound: float
    tpr_bound: float

    @property
    def within_bound(self) -> bool:
        """Whether the measured advantage is at most the bound.

        A point estimate, without a confidence interval; the TPR at low FPR is not
        compared, since estimating it needs far more than ``1 / low_fpr``
        non-members.
        """
        return self.metrics.advantage <= self.advantage_bound

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (an infinite epsilon becomes ``None``)."""
        out = asdict(self)
        out["epsilon"] = None if math.isinf(self.epsilon) else self.epsilon
        out["within_bound"] = self.within_bound
        return out


def membership_report(
    attack: str,
    scores: np.ndarray,
    members: np.ndarray,
    epsilon: float = math.inf,
    delta: float = 0.0,
    low_fpr: float = 0.001,
) -> MembershipReport:
    """Score an attack and state the bounds of (``epsilon``, ``delta``)-DP beside it."""
    metrics = membership_metrics(scores, members, low_fpr)
    return MembershipReport(
        attack=attack,
        metrics=metrics,
        epsilon=epsilon,
        delta=delta,
        advantage_bound=dp_advantage_bound(epsilon, delta),
        tpr_bound=dp_tpr_bound(low_fpr, epsilon, delta),
    )
