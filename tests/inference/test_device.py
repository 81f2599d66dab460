"""The device: one ledger event per query, the budget refuses before computing."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from veil.errors import BudgetExceededError, PrivacyError
from veil.inference import Device, GeneratorLaplace, L1Bound, Perturbation, pure_epsilon
from veil.privacy import InsecureNoiseWarning, PrivacyEvent, PrivacyLedger


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.layer = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), L1Bound(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.layer(x)


pytestmark = pytest.mark.filterwarnings("ignore::veil.privacy.InsecureNoiseWarning")


def test_seeded_noise_on_a_device_warns_once_secure_does_not() -> None:
    import veil.inference.device as module

    module._warned = False
    with pytest.warns(InsecureNoiseWarning, match="SecureLaplace"):
        _device(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _device(None)  # once per process
        Device(_Counting(), Perturbation(1.0, 0.0, 1.0))


def _device(budget: float | None, epsilon: float = 2.0) -> Device:
    g = torch.Generator().manual_seed(0)
    return Device(
        _Counting(),
        Perturbation(1.0, 0.2, epsilon),
        budget,
        noise=GeneratorLaplace(g),
        generator=g,
    )


def test_each_input_is_one_ledger_event() -> None:
    device = _device(None)
    out = device.perturb(torch.randn(5, 3, 4))
    assert out.shape == (5, 6)
    device.perturb(torch.randn(2, 3, 4))
    (event,) = device.ledger.events  # identical events merge
    assert (event.mechanism, event.count) == ("laplace", 7)
    assert event.noise_multiplier == pytest.approx(0.5)
    assert device.epsilon_spent == pytest.approx(14.0)
    assert device.queries_left() is None


def test_budget_refuses_the_query_that_would_exceed_it() -> None:
    device = _device(budget=10.0, epsilon=2.0)  # five queries
    device.perturb(torch.randn(4, 3, 4))
    assert device.queries_left() == 1
    calls, before = device.device_part.calls, device.ledger.to_dict()
    with pytest.raises(BudgetExceededError) as info:
        device.perturb(torch.randn(2, 3, 4))
    assert info.value.epsilon_spent == pytest.approx(8.0)
    assert info.value.epsilon_next == pytest.approx(12.0)
    # nothing was computed or recorded
    assert device.device_part.calls == calls
    assert device.ledger.to_dict() == before
    device.perturb(torch.randn(1, 3, 4))  # exactly at the budget: allowed
    assert device.epsilon_spent == pytest.approx(10.0)
    with pytest.raises(BudgetExceededError):
        device.perturb(torch.randn(1, 3, 4))


def test_budget_holds_across_devices_sharing_a_restored_ledger() -> None:
    first = _device(budget=6.0)
    first.perturb(torch.randn(2, 3, 4))
    restored = PrivacyLedger.from_json(first.ledger.to_json())
    second = Device(first.device_part, first.perturbation, 6.0, restored)
    assert second.queries_left() == 1
    with pytest.raises(BudgetExceededError):
        second.perturb(torch.randn(2, 3, 4))


def test_pure_epsilon_bounds_the_ledgers_pld_epsilon() -> None:
    ledger = PrivacyLedger()
    ledger.record(Perturbation(1.0, 0.0, 0.5).event(40))
    ledger.record(Perturbation(1.0, 0.0, 3.0).event(2))
    assert pure_epsilon(ledger) == pytest.approx(26.0)
    assert ledger.epsilon(1e-6) <= pure_epsilon(ledger) + 1e-9


def test_pure_epsilon_refuses_gaussian_events_and_noiseless_is_infinite() -> None:
    ledger = PrivacyLedger(events=[PrivacyEvent("gaussian", 1.0)])
    with pytest.raises(PrivacyError, match="Laplace"):
        pure_epsilon(ledger)
    assert (
        pure_epsilon(PrivacyLedger(events=[PrivacyEvent("laplace", 0.0)])) == math.inf
    )


@pytest.mark.parametrize("budget", [0.0, -1.0, math.inf])
def test_bad_budget_is_refused(budget: float) -> None:
    with pytest.raises(PrivacyError, match="budget_epsilon"):
        _device(budget)
