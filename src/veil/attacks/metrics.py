"""How well an attack did: image reconstruction quality and membership-test power.

Reconstruction metrics compare an attacker's reconstruction with the true input, both
given as images in pixel units scaled to ``[0, data_range]`` (``data_range = 1`` for
images in [0, 1]): mean squared error, PSNR and SSIM (Wang et al. 2004, the usual
11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03).

Membership metrics take one score per example, larger meaning "more likely a member",
and a boolean label that is ``True`` for members (members are the positive class).
Thresholds are never randomised, so examples with equal scores always fall on the same
side: a score that carries no information gives AUC 0.5 and advantage 0.

(Epsilon, delta)-DP bounds every membership test of one example (Kairouz, Oh and
Viswanath 2015): ``TPR <= e^eps FPR + delta`` and ``e^eps (1 - TPR) >= 1 - delta -
FPR`` (:func:`dp_tpr_bound`); the largest advantage ``TPR - FPR`` over that
region is :func:`dp_advantage_bound`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from veil.errors import VeilError

__all__ = [
    "MembershipMetrics",
    "dp_advantage_bound",
    "dp_tpr_bound",
    "label_accuracy",
    "membership_metrics",
    "mse",
    "psnr",
    "roc_curve",
    "ssim",
]


def _check_images(x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise VeilError(
            f"reconstruction shape must equal the reference's {tuple(ref.shape)}, "
            f"got {tuple(x.shape)}"
        )
    if x.dim() != 4:
        raise VeilError(
            f"images must have shape (N, C, H, W), got {x.dim()} dimensions"
        )


def mse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, shape ``(N,)``; images ``(N, C, H, W)``."""
    _check_images(x, ref)
    return (x.double() - ref.double()).pow(2).flatten(1).mean(1)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, shape ``(N,)``.

    ``10 log10(data_range^2 / MSE)``; ``inf`` for an exact copy.
    """
    err = mse(x, ref)
    return 10 * torch.log10(data_range**2 / err)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    x: torch.Tensor,
    ref: torch.Tensor,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity per image (mean over channels and positions), ``(N,)``.

    Local statistics use a ``window x window`` Gaussian of standard deviation
    ``sigma`` over every position where the window fits; 1 for identical images,
    near 0 for unrelated ones, at least -1.
    """
    _check_images(x, ref)
    if min(x.shape[-2:]) < window:
        raise VeilError(
            f"images must be at least {window} pixels on a side for SSIM, got "
            f"{tuple(x.shape[-2:])}"
        )
    channels = x.shape[1]
    kernel = _gaussian_window(window, sigma).expand(channels, 1, window, window)
    a, b = x.double(), ref.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1)


def label_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Fraction of labels recovered, as multisets (order within a batch is unknown).

    A batch's labels are compared as counts per class, so ``[3, 5]`` against
    ``[5, 3]`` is 1.0 and ``[3, 3]`` against ``[3, 5]`` is 0.5.
    """
    if predicted.shape != true.shape:
        raise VeilError(
            f"predicted labels must have shape {tuple(true.shape)}, got "
            f"{tuple(predicted.shape)}"
        )
    if true.numel() == 0:
        raise VeilError("label_accuracy needs at least one label, got 0")
    size = int(max(predicted.max(), true.max())) + 1
    both = torch.minimum(
        torch.bincount(predicted, minlength=size), torch.bincount(true, minlength=size)
    )
    return float(both.sum()) / true.numel()


def _check_scores(scores: np.ndarray, members: np.ndarray) -> None:
    if scores.shape != members.shape or scores.ndim != 1:
        raise VeilError(
            "scores and members must be 1-D of the same length, got shapes "
            f"{scores.shape} and {members.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise VeilError("scores must be finite, got NaN or inf")
    if members.all() or not members.any():
        raise VeilError(
            "membership metrics need both members and non-members, got "
            f"{int(members.sum())} members among {len(members)}"
        )


def roc_curve(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR of the test "member if score >= t" for every distinct ``t``.

    Starts at (0, 0) (no one called a member) and ends at (1, 1); equal scores are
    never split.
    """
    scores = np.asarray(scores, dtype=np.float64)
    members = np.asarray(members, dtype=bool)
    _check_scores(scores, members)
    order = np.argsort(-scores, kind="stable")
    s, m = scores[order], members[order]
    last_of_value = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(m)[last_of_value]
    fp = np.cumsum(~m)[last_of_value]
    tpr = np.r_[0.0, tp / m.sum()]
    fpr = np.r_[0.0, fp / (~m).sum()]
    return fpr, tpr


@dataclass(frozen=True)
class MembershipMetrics:
    """The power of a membership test.

    Attributes:
        auc: area under the ROC curve; the probability that a random member scores
            above a random non-member, ties counted one half. 0.5 is chance.
        advantage: largest ``TPR - FPR`` over thresholds (Yeom et al. 2018), in [0, 1].
        tpr_at_low_fpr: largest TPR at a threshold whose FPR is at most
            ``low_fpr``.
        low_fpr: the FPR of ``tpr_at_low_fpr`` (default 0.001).
        members: number of members scored.
        non_members: number of non-members scored.
    """

    auc: float
    advantage: float
    tpr_at_low_fpr: float
    low_fpr: float
    members: int
    non_members: int


def membership_metrics(
    scores: np.ndarray | torch.Tensor,
    members: np.ndarray | torch.Tensor,
    low_fpr: float = 0.001,
) -> MembershipMetrics:
    """AUC, advantage and TPR at ``low_fpr`` of scores (larger means member)."""
    if not 0 < low_fpr < 1:
        raise VeilError(f"low_fpr must be in (0, 1), got {low_fpr}")
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(members, dtype=bool)
    fpr, tpr = roc_curve(s, m)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return MembershipMetrics(
        auc=auc,
        advantage=float(np.max(tpr - fpr)),
        tpr_at_low_fpr=float(np.max(tpr[fpr <= low_fpr])),
        low_fpr=low_fpr,
        members=int(m.sum()),
        non_members=int((~m).sum()),
    )


def _check_eps_delta(epsilon: float, delta: float) -> None:
    if not epsilon >= 0:
        raise VeilError(f"epsilon must be >= 0 (inf allowed), got {epsilon}")
    if not 0 <= delta < 1:
        raise VeilError(f"delta must be in [0, 1), got {delta}")


def dp_tpr_bound(fpr: float, epsilon: float, delta: float) -> float:
    """Largest TPR any membership test can have at ``fpr`` against (eps, delta)-DP.

    ``min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))``: both conditions of
    the hypothesis-testing view of DP (Kairouz et al. 2015). ``epsilon = inf``
    gives 1.
    """
    _check_eps_delta(epsilon, delta)
    if math.isinf(epsilon):
        return 1.0
    first = math.exp(epsilon) * fpr + delta
    second = 1 - math.exp(-epsilon) * (1 - delta - fpr)
    return max(0.0, min(1.0, first, second))


def dp_advantage_bound(epsilon: float, delta: float) -> float:
    """Largest ``TPR - FPR`` of any membership test against (eps, delta)-DP.

    ``(e^eps - 1 + 2 delta) / (e^eps + 1)``, reached at the corner of the region of
    :func:`dp_tpr_bound`; 1 for ``epsilon = inf``.
    """
    _check_eps_delta(epsilon, delta)
    if math.isinf(epsilon):
        return 1.0
    e = math.exp(epsilon)
    return min(1.0, (e - 1 + 2 * delta) / (e + 1))
