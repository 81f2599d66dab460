"""Membership inference scores and reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from veil.attacks import (
    calibrated_scores,
    loss_threshold_scores,
    membership_metrics,
    membership_report,
    per_example_losses,
)
from veil.errors import VeilError


def _difficulty_world(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Losses where each example has its own difficulty and membership lowers the
    target's loss a little: the setting difficulty calibration is made for."""
    rng = np.random.default_rng(seed)
    difficulty = rng.exponential(1.0, n)
    members = rng.random(n) < 0.5
    target = difficulty * np.where(members, 0.6, 1.0) * rng.lognormal(0, 0.05, n)
    refs = difficulty * rng.lognormal(0, 0.05, (4, n))
    return target, refs, members


def test_loss_threshold_sees_lower_member_losses() -> None:
    target, _, members = _difficulty_world()
    auc = membership_metrics(loss_threshold_scores(target), members).auc
    assert 0.55 < auc < 0.8


@pytest.mark.parametrize("scale", ["logit", "loss"])
def test_calibration_removes_example_difficulty(scale: str) -> None:
    target, refs, members = _difficulty_world()
    plain = membership_metrics(loss_threshold_scores(target), members)
    calibrated = membership_metrics(
        calibrated_scores(target, refs, scale),
        members,  # type: ignore[arg-type]
    )
    assert calibrated.auc > 0.95 > plain.auc


def test_calibrated_scores_refuse_mismatched_references() -> None:
    with pytest.raises(VeilError, match="reference_losses must have shape"):
        calibrated_scores(np.zeros(3), np.zeros((2, 4)))


def test_report_states_the_bound_beside_the_measure() -> None:
    members = np.array([True, False] * 10)
    report = membership_report("x", np.arange(20.0)[::-1], members, 1.0, 1e-5)
    e = math.e
    assert report.advantage_bound == pytest.approx((e - 1 + 2e-5) / (e + 1))
    assert report.metrics.advantage == pytest.approx(0.1)
    assert report.tpr_bound == pytest.approx(e * 0.001 + 1e-5)
    assert report.within_bound
    assert not membership_report("x", np.arange(20.0)[::-1], members, 0.1).within_bound
    assert report.to_dict()["epsilon"] == 1.0
    assert membership_report("x", np.zeros(20), members).to_dict()["epsilon"] is None


def test_per_example_losses_match_cross_entropy() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    losses = per_example_losses(model, x, y, batch_size=3)
    expected = nn.functional.cross_entropy(model(x), y, reduction="none")
    assert np.allclose(losses, expected.detach().numpy(), atol=1e-6)
