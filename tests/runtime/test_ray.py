"""The Ray runtime: the same results as the simulation runtime for the same seed.

Runs on a small local Ray (2 CPUs), started once for the module.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import pytest
import ray
import torch

from tests.conftest import make_tiny
from veil.errors import BudgetExceededError, ConfigError, DataError
from veil.learning import FedAvg, SGDTrainer
from veil.models import build_model
from veil.privacy import DPSGDTrainer, PrivacyBudget, PrivacyLedger
from veil.runtime import RayRuntime, SimulationRuntime

MODEL_FN = functools.partial(build_model, "2nn")


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _fedavg(**kwargs: object) -> FedAvg:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        init = build_model("2nn").state_dict()
    return FedAvg(init, 6, 0.5, SGDTrainer(0.1, 1, 10), seed=3, **kwargs)  # type: ignore[arg-type]


def _parts(n: int, k: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(0).permutation(n), k)


def test_same_model_as_simulation_for_the_same_seed() -> None:
    data = make_tiny(n_train=240, n_test=10)
    parts = _parts(240, 6)
    sim, on_ray = _fedavg(), _fedavg()
    simulation = SimulationRuntime(MODEL_FN, data.train, parts)
    runtime = RayRuntime(MODEL_FN, data.train, parts)
    for rnd in (1, 2, 3):
        a = simulation.run_round(sim, rnd)
        b = runtime.run_round(on_ray, rnd)
        assert (a.clients, a.bytes_up, a.bytes_down) == (
            b.clients,
            b.bytes_up,
            b.bytes_down,
        )
        assert a.train_loss == b.train_loss
    for name, value in sim.global_state.items():
        assert torch.equal(value, on_ray.global_state[name]), name
    runtime.shutdown()
    assert ray.is_initialized()  # a Ray it did not start is left running


class _Ledgers:
    """Per-client DP-SGD trainers and ledgers, as the runner's ClientPrivacy."""

    def __init__(self, k: int, epsilon: float) -> None:
        self.trainer = DPSGDTrainer(
            lr=0.1, clipping_norm=1.0, noise_multiplier=1.0, sample_rate=0.25, steps=4
        )
        budget = PrivacyBudget(epsilon, 1e-3)
        self.ledgers = {i: PrivacyLedger("rdp", budget=budget) for i in range(k)}

    def trainer_for(self, client_id: int) -> DPSGDTrainer:
        return self.trainer.with_ledger(self.ledgers[client_id])

    def client_state(self, client_id: int) -> dict:
        return self.ledgers[client_id].to_dict()

    def load_client_state(self, client_id: int, state: dict) -> None:
        self.ledgers[client_id] = PrivacyLedger.from_dict(state)


def _dp_run(runtime: object, epsilon: float, rounds: int) -> tuple[FedAvg, _Ledgers]:
    ledgers = _Ledgers(6, epsilon)
    algorithm = _fedavg(trainer_for=ledgers.trainer_for, client_states=ledgers)
    for rnd in range(1, rounds + 1):
        runtime.run_round(algorithm, rnd)  # type: ignore[attr-defined]
    return algorithm, ledgers


def test_dp_clients_ledgers_come_back_from_the_workers() -> None:
    data = make_tiny(n_train=240, n_test=10)
    parts = _parts(240, 6)
    sim, sim_ledgers = _dp_run(SimulationRuntime(MODEL_FN, data.train, parts), 50, 3)
    ray_alg, ray_ledgers = _dp_run(RayRuntime(MODEL_FN, data.train, parts), 50, 3)

    assert any(ledger.events for ledger in ray_ledgers.ledgers.values())
    assert ray_ledgers.ledgers == sim_ledgers.ledgers
    for name, value in sim.global_state.items():
        assert torch.equal(value, ray_alg.global_state[name]), name


def test_budget_stop_keeps_every_ledger_within_the_budget() -> None:
    """Ray runs a round's clients at once: when one client's budget stops the round,
    the round's other clients have trained too, and their ledgers say so (the
    simulation runtime stops at the first). Nothing of that round is aggregated."""
    data = make_tiny(n_train=240, n_test=10)
    parts = _parts(240, 6)

    # A budget that runs out within a few rounds, part-way through a client.
    def ledgers_at_stop(runtime: object) -> dict[int, PrivacyLedger]:
        ledgers = _Ledgers(6, 3.0)
        algorithm = _fedavg(trainer_for=ledgers.trainer_for, client_states=ledgers)
        rnd = 0
        with pytest.raises(BudgetExceededError):
            while True:
                rnd += 1
                runtime.run_round(algorithm, rnd)  # type: ignore[attr-defined]
        return ledgers.ledgers

    sim = ledgers_at_stop(SimulationRuntime(MODEL_FN, data.train, parts))
    on_ray = ledgers_at_stop(RayRuntime(MODEL_FN, data.train, parts))
    assert sim.keys() == on_ray.keys()
    for k in sim:
        assert sim[k].epsilon(1e-3) <= on_ray[k].epsilon(1e-3) <= 3.0
    assert sum(on_ray[k] == sim[k] and bool(sim[k].events) for k in sim) >= 1


def test_task_for_unknown_client_is_refused_before_any_work() -> None:
    data = make_tiny(n_train=20, n_test=10)
    algorithm = FedAvg(build_model("2nn").state_dict(), 5, 1.0, SGDTrainer(0.1))
    runtime = RayRuntime(MODEL_FN, data.train, np.array_split(np.arange(20), 2))
    before = {k: v.clone() for k, v in algorithm.global_state.items()}
    with pytest.raises(DataError, match=r"client_id must be in \[0, 2\)"):
        runtime.run_round(algorithm, 1)
    for name, value in before.items():
        assert torch.equal(value, algorithm.global_state[name])


def test_bad_resources_are_refused() -> None:
    data = make_tiny(n_train=20, n_test=10)
    parts = np.array_split(np.arange(20), 2)
    with pytest.raises(ConfigError, match="cpus_per_client must be > 0"):
        RayRuntime(MODEL_FN, data.train, parts, cpus_per_client=0)
    with pytest.raises(ConfigError, match="memory_per_client must be > 0"):
        RayRuntime(MODEL_FN, data.train, parts, memory_per_client=0)


def _count_examples(
    state: dict[str, int], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, int], int]:
    """A client step: the state counts the client's turns and labels seen."""
    if int(y.sum()) < 0:
        raise DataError("labels must be >= 0")
    state = {**state, "turns": state["turns"] + 1, "labels": state["labels"] + len(y)}
    return state, int(y.sum())


def test_client_state_stays_on_ray_between_turns() -> None:
    data = make_tiny(n_train=60, n_test=10)
    parts = _parts(60, 3)
    runtimes = {
        "simulation": SimulationRuntime(MODEL_FN, data.train, parts),
        "ray": RayRuntime(MODEL_FN, data.train, parts),
    }
    seen: dict[str, tuple[list[object], list[int]]] = {}
    for name, runtime in runtimes.items():
        states: list[object] = [{"turns": 0, "labels": 0} for _ in parts]
        replies = []
        for k in (2, 0, 2, 1):
            states[k], reply = runtime.run_client(_count_examples, k, states[k])
            replies.append(reply)
        seen[name] = (runtime.fetch(states), replies)
    assert isinstance(
        runtimes["ray"].run_client(_count_examples, 0, {"turns": 0, "labels": 0})[0],
        ray.ObjectRef,
    )
    assert seen["ray"] == seen["simulation"]
    assert seen["ray"][0][2] == {"turns": 2, "labels": 2 * len(parts[2])}
    expected = [int(data.train.y[parts[k]].sum()) for k in (2, 0, 2, 1)]
    assert seen["ray"][1] == expected


def test_client_step_error_is_the_clients_own() -> None:
    data = make_tiny(n_train=20, n_test=10)
    runtime = RayRuntime(MODEL_FN, data.train, np.array_split(np.arange(20), 2))
    bad = make_tiny(n_train=20, n_test=10).train
    bad.y[:] = -1
    broken = RayRuntime(MODEL_FN, bad, np.array_split(np.arange(20), 2))
    with pytest.raises(DataError, match="labels must be >= 0"):
        broken.run_client(_count_examples, 1, {"turns": 0, "labels": 0})
    with pytest.raises(DataError, match=r"client_id must be in \[0, 2\)"):
        runtime.run_client(_count_examples, 2, {"turns": 0, "labels": 0})
