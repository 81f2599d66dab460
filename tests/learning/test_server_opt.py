"""The server step: plain averaging by default, heavy-ball momentum by hand, and the
same step inside FedAvg and DP-FedAvg."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from veil.errors import ConfigError
from veil.learning import ClientResult, DPFedAvg, FedAvg, SGDTrainer
from veil.learning.server_opt import server_step
from veil.privacy import PrivacyLedger


def state(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values)}


@given(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=5),
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=5),
)
def test_default_step_is_plain_addition_bit_for_bit(
    w: list[float], m: list[float]
) -> None:
    size = min(len(w), len(m))
    weights, mean = state(*w[:size]), state(*m[:size])
    new, _ = server_step(weights, mean, None)
    assert torch.equal(new["w"], weights["w"] + mean["w"])


def test_momentum_matches_hand_computation() -> None:
    # v1 = m1 = 1; w1 = 0 + 0.5 * 1 = 0.5. v2 = 0.9 * 1 + 2 = 2.9; w2 = 0.5 + 1.45.
    w, v = server_step(state(0.0), state(1.0), None, lr=0.5, momentum=0.9)
    assert torch.allclose(w["w"], torch.tensor([0.5]))
    w, v = server_step(w, state(2.0), v, lr=0.5, momentum=0.9)
    assert torch.allclose(v["w"], torch.tensor([2.9]))
    assert torch.allclose(w["w"], torch.tensor([1.95]))


def test_step_keeps_model_dtype_and_leaves_inputs_untouched() -> None:
    weights = state(1.0, 2.0)
    mean = {"w": torch.tensor([0.25, -0.5], dtype=torch.float64)}
    new, velocity = server_step(weights, mean, None, lr=2.0, momentum=0.5)
    assert new["w"].dtype == torch.float32
    assert torch.equal(weights["w"], torch.tensor([1.0, 2.0]))
    velocity["w"].add_(1.0)  # the velocity must not alias the mean
    assert torch.equal(mean["w"], torch.tensor([0.25, -0.5], dtype=torch.float64))
    assert torch.allclose(new["w"], torch.tensor([1.5, 1.0]))


@pytest.mark.parametrize(
    ("lr", "momentum"), [(0.0, 0.0), (-1.0, 0.0), (float("inf"), 0.0), (1.0, 1.0)]
)
def test_bad_settings_are_refused(lr: float, momentum: float) -> None:
    with pytest.raises(ConfigError, match="server_lr must be"):
        server_step(state(0.0), state(1.0), None, lr=lr, momentum=momentum)
    with pytest.raises(ConfigError, match="server_lr must be"):
        FedAvg(
            state(0.0), 2, 1.0, SGDTrainer(0.1), server_lr=lr, server_momentum=momentum
        )


def test_fedavg_takes_momentum_steps_on_the_mean() -> None:
    algo = FedAvg(
        state(0.0, 0.0), 2, 1.0, SGDTrainer(0.1), server_lr=1.0, server_momentum=0.5
    )
    for rnd in (1, 2):
        results = [
            ClientResult(0, rnd, state(1.0, 0.0), 1, 0.0),
            ClientResult(1, rnd, state(3.0, 2.0), 3, 0.0),
        ]
        algo.aggregate(rnd, results)
    # mean = (1*[1,0] + 3*[3,2]) / 4 = [2.5, 1.5]; v1 = mean, v2 = 1.5 * mean.
    assert torch.allclose(algo.global_state["w"], torch.tensor([6.25, 3.75]))


def test_dp_fedavg_without_noise_steps_like_fedavg() -> None:
    """Same updates (inside S), noise 0, q = 1, equal weights: the two algorithms'
    server steps agree round after round."""
    common = {"server_lr": 0.7, "server_momentum": 0.8}
    fedavg = FedAvg(state(0.0, 0.0), 2, 1.0, SGDTrainer(0.1), **common)
    dp = DPFedAvg(
        state(0.0, 0.0), 2, 1.0, 10.0, 0.0, SGDTrainer(0.1), PrivacyLedger(), **common
    )
    for rnd in (1, 2, 3):
        results = [
            ClientResult(0, rnd, state(0.1 * rnd, -0.2), 1, 0.0),
            ClientResult(1, rnd, state(0.3, 0.4 / rnd), 1, 0.0),
        ]
        fedavg.aggregate(rnd, results)
        dp.configure_round(rnd)
        dp.aggregate(rnd, results)
        assert torch.allclose(fedavg.global_state["w"], dp.global_state["w"])
