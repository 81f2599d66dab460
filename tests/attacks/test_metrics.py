"""Metric definitions checked on inputs whose answer is known independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.attacks import (
    dp_advantage_bound,
    dp_tpr_bound,
    label_accuracy,
    membership_metrics,
    mse,
    psnr,
    roc_curve,
    ssim,
)
from veil.errors import VeilError


def _images(seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_mse_and_psnr_of_a_constant_offset() -> None:
    ref = torch.full((1, 1, 28, 28), 0.5)
    x = ref + 0.1
    assert mse(x, ref).item() == pytest.approx(0.01)
    assert psnr(x, ref).item() == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert math.isinf(psnr(ref, ref).item())


def test_ssim_is_one_for_identical_and_symmetric() -> None:
    a, b = _images(0), _images(1)
    assert ssim(a, a) == pytest.approx(torch.ones(2, dtype=torch.float64))
    assert torch.allclose(ssim(a, b), ssim(b, a))
    assert (ssim(a, b).abs() < 0.2).all()  # independent noise images


def test_ssim_matches_a_direct_window_computation() -> None:
    """One 11x11 window, computed by hand with numpy, against the 11x11 image."""
    a = torch.rand(1, 1, 11, 11, generator=torch.Generator().manual_seed(2))
    b = (a + 0.2 * torch.rand(1, 1, 11, 11)).clamp(0, 1)
    coords = np.arange(11) - 5.0
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    x, y = a[0, 0].double().numpy(), b[0, 0].double().numpy()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cxy = (w * (x - mx) * (y - my)).sum()
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / (
        (mx**2 + my**2 + c1) * (vx + vy + c2)
    )
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-9)


def test_image_metrics_refuse_mismatched_shapes() -> None:
    with pytest.raises(VeilError, match="shape"):
        mse(_images(n=1), _images(n=2))


def test_label_accuracy_compares_multisets() -> None:
    assert label_accuracy(torch.tensor([3, 5]), torch.tensor([5, 3])) == 1.0
    assert label_accuracy(torch.tensor([3, 3]), torch.tensor([3, 5])) == 0.5


def test_perfect_and_inverted_scores() -> None:
    members = np.array([True] * 5 + [False] * 5)
    scores = np.arange(10, 0, -1.0)  # members score highest
    m = membership_metrics(scores, members)
    assert (m.auc, m.advantage, m.tpr_at_low_fpr) == (1.0, 1.0, 1.0)
    inverted = membership_metrics(-scores, members)
    assert inverted.auc == 0.0 and inverted.advantage == 0.0


def test_equal_scores_give_chance() -> None:
    members = np.array([True, False] * 50)
    m = membership_metrics(np.zeros(100), members)
    assert m.auc == 0.5
    assert m.advantage == 0.0
    assert m.tpr_at_low_fpr == 0.0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=2, max_size=30),
    st.lists(st.integers(0, 5), min_size=2, max_size=30),
)
def test_auc_is_the_mann_whitney_probability(ins: list[int], outs: list[int]) -> None:
    """AUC equals P(member score > non-member score) + P(equal) / 2, by brute force."""
    scores = np.array(ins + outs, dtype=float)
    members = np.array([True] * len(ins) + [False] * len(outs))
    pairs = [(a > b) + 0.5 * (a == b) for a in ins for b in outs]
    assert membership_metrics(scores, members).auc == pytest.approx(np.mean(pairs))


def test_advantage_and_low_fpr_on_a_known_roc() -> None:
    # 4 members (scores 4, 3, 2, 0), 4 non-members (2.5, 1, 0, -1).
    scores = np.array([4, 3, 2, 0, 2.5, 1, 0, -1], dtype=float)
    members = np.array([True] * 4 + [False] * 4)
    fpr, tpr = roc_curve(scores, members)
    assert list(fpr) == [0, 0, 0, 0.25, 0.25, 0.5, 0.75, 1.0]
    assert list(tpr) == [0, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0]
    m = membership_metrics(scores, members, low_fpr=0.2)
    assert m.advantage == 0.5 and m.tpr_at_low_fpr == 0.5


def test_membership_metrics_refuse_one_class() -> None:
    with pytest.raises(VeilError, match="both members and non-members"):
        membership_metrics(np.zeros(3), np.ones(3, bool))


def test_dp_bounds() -> None:
    assert dp_advantage_bound(0.0, 0.0) == 0.0
    assert dp_advantage_bound(math.inf, 0.0) == 1.0
    e = math.exp(1.0)
    assert dp_advantage_bound(1.0, 1e-5) == pytest.approx((e - 1 + 2e-5) / (e + 1))
    assert dp_tpr_bound(0.001, 1.0, 0.0) == pytest.approx(e * 0.001)
    assert dp_tpr_bound(0.9, 1.0, 0.0) == pytest.approx(1 - 0.1 / e)
    # The advantage bound is the largest TPR - FPR over the region.
    grid = np.linspace(0, 1, 10001)
    best = max(dp_tpr_bound(f, 1.0, 1e-5) - f for f in grid)
    assert best == pytest.approx(dp_advantage_bound(1.0, 1e-5), abs=1e-4)
