"""DP-FedAvg's distributed noise under secure aggregation: the securely summed round
matches the plain distributed round up to quantisation, the server's only view is
the sum, the noise is added exactly once (dropouts topped up), and `veil run`."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

import veil.experiment._secure_dp_fedavg as secure_module
from tests.learning.test_dp_fedavg import SetUpdate, Vector
from veil.data import FederatedDataset
from veil.errors import ConfigError
from veil.experiment import parse_config, run_experiment
from veil.experiment._dp import read_privacy
from veil.experiment._secure_dp_fedavg import SecureDPFedAvg
from veil.experiment.config import SecAggConfig
from veil.learning import AdaptiveClipping, DPFedAvg
from veil.privacy import PrivacyLedger
from veil.secagg import SecureSum, Step

pytestmark = pytest.mark.filterwarnings("ignore::veil.privacy.InsecureNoiseWarning")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def settings(dim: int, num_clients: int = 10, **kwargs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "global_state": {"w": torch.zeros(dim)},
        "num_clients": num_clients,
        "sample_rate": 0.5,
        "clipping_norm": 2.0,
        "noise_multiplier": 1.5,
        "trainer": SetUpdate(tuple(0.5 * k for k in range(num_clients))),
        "ledger": PrivacyLedger(),
        "sampling": "fixed",
        "placement": "distributed",
        "seed": 3,
    }
    out.update(kwargs)
    return out


def run_round(algo: DPFedAvg, rnd: int = 1, dim: int = 100) -> None:
    model = Vector(dim)
    results = [
        algo.client_fit(t, model, torch.tensor([float(t.client_id)]), torch.ones(1))
        for t in algo.configure_round(rnd)
    ]
    algo.aggregate(rnd, results)


@pytest.mark.parametrize("adaptive", [False, True])
def test_secure_round_equals_the_plain_distributed_round(adaptive: bool) -> None:
    # Same seed, same tasks, same client noise: only encoding separates the two.
    dim, bits = 300, 20
    extra = {"adaptive": AdaptiveClipping(5.0)} if adaptive else {}
    plain = DPFedAvg(**settings(dim, **extra))
    secure = SecureDPFedAvg(**settings(dim, **extra), secagg=SecAggConfig(bits=bits))
    run_round(plain, dim=dim)
    run_round(secure, dim=dim)
    n = len(secure.last_included)
    assert n == 5
    r, r_b = secure.ranges(1)
    step = secure.encoder(n).step  # in units of r
    error = n * step / 2 * r / plain.expected_clients
    diff = (plain.global_state["w"] - secure.global_state["w"]).abs().max()
    assert error > 0 and float(diff) <= error + 1e-6
    assert float(diff) > 0  # 20 bits: the rounding shows, and stays in its bound
    assert plain.ledger.events == secure.ledger.events
    if adaptive:
        gap = abs(plain.history[-1].unclipped - secure.history[-1].unclipped)
        assert gap <= n * step / 2 * r_b / plain.expected_clients + 1e-12


def test_the_server_sees_only_the_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    # Wrap secure_sum: record the clients' encoded inputs and every message the
    # server received. No message holds a client's input; the result is their sum.
    seen: dict[str, Any] = {"messages": []}
    real = secure_module.secure_sum

    def spy(inputs: dict[int, np.ndarray], bits: int, **kw: Any) -> SecureSum:
        seen["inputs"] = inputs

        def intercept(step: Step, sender: int, data: bytes) -> list[tuple[int, bytes]]:
            seen["messages"].append(data)
            return [(sender, data)]

        result = real(inputs, bits, intercept=intercept, **kw)
        seen["result"] = result
        return result

    monkeypatch.setattr(secure_module, "secure_sum", spy)
    algo = SecureDPFedAvg(**settings(1000), secagg=SecAggConfig(bits=32))
    run_round(algo, dim=1000)
    inputs, result = seen["inputs"], seen["result"]
    total = sum(v.astype(np.uint64) for v in inputs.values()) % 2**32
    assert np.array_equal(result.total.astype(np.uint64), total)
    for code in inputs.values():
        for message in seen["messages"]:
            assert code.tobytes()[:64] not in message


@pytest.mark.parametrize("dropout_rate", [0.0, 0.3])
def test_noise_is_added_exactly_once(dropout_rate: float) -> None:
    # Zero updates: the average is pure noise N(0, (z S / (q N))^2), with secure
    # aggregation and with clients dropped inside the protocol (topped up by the
    # server). Twice the noise would give a ratio of 2, half of it 1/2.
    dim = 20_000
    secagg = SecAggConfig(bits=32, dropout_rate=dropout_rate)
    algo = SecureDPFedAvg(
        **settings(dim, trainer=SetUpdate((0.0,) * 10), sample_rate=1.0),
        secagg=secagg,
    )
    run_round(algo, dim=dim)
    included = len(algo.last_included)
    assert included == 10 if dropout_rate == 0 else 6 <= included < 10
    noise = algo.global_state["w"].double().numpy()
    expected = 1.5 * 2.0 / 10
    low, high = stats.chi2.ppf([1e-4, 1 - 1e-4], dim) / dim
    assert low < float(np.mean(noise**2)) / expected**2 < high


def test_secure_aggregation_needs_distributed_noise() -> None:
    with pytest.raises(ConfigError, match="placement = 'distributed'"):
        SecureDPFedAvg(**settings(10, placement="central"))


BASE = """
name = "tiny-secure-dp-fedavg"
seed = 1
methods = ["dp-fedavg"]
[data]
dataset = "tiny"
num_clients = 20
[model]
name = "2nn"
[local]
lr = 0.2
batch_size = 10
[secagg]
neighbours = "auto"
dropout_rate = 0.1
"""


def test_veil_run_with_secure_aggregation(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    section = (
        "[dp_fedavg]\nrounds = 2\nsample_rate = 0.25\nnoise_multiplier = 1.0\n"
        "placement = 'distributed'\nsecure_aggregation = true\n"
        "adaptive_clipping = true\n"
    )
    config = parse_config(tomllib.loads(BASE + section))
    run_dir = run_experiment(config, run_dir=tmp_path / "run", progress=False)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines if x]
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["secagg_clients"] >= 2 and r["secagg_bytes_up"] > 0 for r in records)
    privacy = read_privacy(run_dir)["dp-fedavg"]
    assert privacy["trust_model"] == "distributed + secure aggregation"
    assert "masked sum" in (run_dir / "report.md").read_text()


def test_config_refuses_secure_aggregation_with_central_noise() -> None:
    section = "[dp_fedavg]\nnoise_multiplier = 1.0\nsecure_aggregation = true\n"
    with pytest.raises(ConfigError, match="placement = 'distributed'"):
        parse_config(tomllib.loads(BASE + section))


def test_a_round_with_one_client_releases_nothing() -> None:
    # The sum of one input is that input: the round is skipped, nothing recorded.
    algo = SecureDPFedAvg(**settings(10, sample_rate=0.1), secagg=SecAggConfig())
    run_round(algo, dim=10)
    assert torch.equal(algo.global_state["w"], torch.zeros(10))
    assert not algo.ledger.events and not algo.history
    assert algo.take_metrics()["secagg_aborted"] == 1


def test_bits_too_small_for_the_population_are_refused_up_front() -> None:
    with pytest.raises(ConfigError, match=r"secagg\.bits"):
        SecureDPFedAvg(**settings(10, num_clients=10), secagg=SecAggConfig(bits=4))
