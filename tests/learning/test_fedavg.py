"""FedAvg: the weighted mean, refusals that leave the model unchanged, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny
from veil.data import iid
from veil.errors import UpdateError
from veil.learning import ClientResult, FedAvg, SGDTrainer, weighted_average
from veil.models import build_model
from veil.runtime import SimulationRuntime


def state(**tensors: list[float]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in tensors.items()}


def test_weighted_mean_matches_hand_computation() -> None:
    ref = state(w=[0.0, 0.0], b=[0.0])
    updates = [state(w=[1.0, 2.0], b=[3.0]), state(w=[-1.0, 4.0], b=[0.0])]
    # Weights 1 and 3: w = (1*[1,2] + 3*[-1,4]) / 4 = [-0.5, 3.5]; b = 3/4.
    mean = weighted_average(updates, [1.0, 3.0], ref)
    assert torch.allclose(mean["w"], torch.tensor([-0.5, 3.5]))
    assert torch.allclose(mean["b"], torch.tensor([0.75]))


def make_algorithm() -> FedAvg:
    return FedAvg(
        global_state=state(w=[1.0, 1.0]),
        num_clients=4,
        client_fraction=0.5,
        trainer=SGDTrainer(lr=0.1),
    )


def result(update: dict[str, torch.Tensor], n: int, rnd: int = 1) -> ClientResult:
    return ClientResult(0, rnd, update, n, 0.0)


@pytest.mark.parametrize(
    ("results", "match"),
    [
        (
            [result(state(w=[1.0, 2.0]), 0), result(state(w=[3.0, 4.0]), 0)],
            "sum to zero",
        ),
        ([result(state(w=[1.0, float("nan")]), 5)], "NaN or Inf"),
        ([result(state(w=[float("inf"), 0.0]), 5)], "NaN or Inf"),
        # The sum is checked once: Inf - Inf is NaN there, and the scan names
        # the first bad update; a zero-weight update is checked on its own.
        (
            [
                result(state(w=[1.0, 2.0]), 5),
                result(state(w=[float("inf"), 0.0]), 5),
                result(state(w=[float("-inf"), 0.0]), 5),
            ],
            "update 1: tensor 'w' holds NaN or Inf",
        ),
        (
            [result(state(w=[1.0, 2.0]), 5), result(state(w=[float("nan"), 0]), 0)],
            "update 1: tensor 'w' holds NaN or Inf",
        ),
        ([result(state(w=[1.0, 2.0, 3.0]), 5)], "shape"),
        ([result(state(v=[1.0, 2.0]), 5)], "missing \\['w'\\]"),
        ([result(state(w=[1.0, 2.0]), 5, rnd=2)], "round 2"),
        ([], "zero updates"),
    ],
)
def test_refused_round_leaves_model_unchanged(
    results: list[ClientResult], match: str
) -> None:
    algorithm = make_algorithm()
    before = {k: v.clone() for k, v in algorithm.global_state.items()}
    with pytest.raises(UpdateError, match=match):
        algorithm.aggregate(1, results)
    assert all(torch.equal(before[k], algorithm.global_state[k]) for k in before)


def test_aggregate_applies_weighted_update() -> None:
    algorithm = make_algorithm()
    algorithm.aggregate(
        1, [result(state(w=[2.0, 0.0]), 1), result(state(w=[0.0, 4.0]), 3)]
    )
    assert torch.allclose(algorithm.global_state["w"], torch.tensor([1.5, 4.0]))


def train_fedavg(
    seed: int, rounds: int = 3, reverse: bool = False
) -> dict[str, torch.Tensor]:
    data = make_tiny(n_train=300, n_test=10)
    parts = iid(300, 10, np.random.default_rng(0))
    torch.manual_seed(0)
    algorithm = FedAvg(
        build_model("2nn").state_dict(), 10, 0.3, SGDTrainer(0.05, 1, 10), seed=seed
    )
    if reverse:  # clients run in the opposite order: results must not change
        configure = algorithm.configure_round
        algorithm.configure_round = lambda rnd: configure(rnd)[::-1]  # type: ignore[method-assign]
    runtime = SimulationRuntime(lambda: build_model("2nn"), data.train, parts)
    for rnd in range(1, rounds + 1):
        runtime.run_round(algorithm, rnd)
    return algorithm.global_state


def test_same_seed_same_model_and_order_free() -> None:
    a, b = train_fedavg(seed=1), train_fedavg(seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train_fedavg(seed=2)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    d = train_fedavg(seed=1, reverse=True)
    assert all(torch.allclose(a[k], d[k], atol=1e-6) for k in a)


def test_clients_per_round_and_sampling() -> None:
    algorithm = FedAvg(state(w=[0.0]), 100, 0.1, SGDTrainer(0.1), seed=3)
    tasks = algorithm.configure_round(1)
    ids = [t.client_id for t in tasks]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert ids != [t.client_id for t in algorithm.configure_round(2)]
    assert len({t.seed for t in tasks}) == 10
    tiny = FedAvg(state(w=[0.0]), 3, 0.01, SGDTrainer(0.1))
    assert len(tiny.configure_round(1)) == 1  # m = max(C K, 1)
