"""FedAvg with secure aggregation: the same mean as plain FedAvg, from the sum only."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from veil.data import FederatedDataset
from veil.errors import ConfigError
from veil.experiment import parse_config, run_experiment
from veil.experiment._secagg import SecureFedAvg
from veil.experiment.config import SecAggConfig
from veil.learning import ClientResult, SGDTrainer, weighted_average

STATE = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Training in these tests is tiny: extra threads only contend for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _algorithm(**secagg: object) -> SecureFedAvg:
    return SecureFedAvg(
        global_state={k: v.clone() for k, v in STATE.items()},
        num_clients=10,
        client_fraction=1.0,
        trainer=SGDTrainer(0.1, 1, 10),
        seed=3,
        secagg=SecAggConfig(**secagg),  # type: ignore[arg-type]
        max_examples=50,
    )


def _results(rnd: int) -> list[ClientResult]:
    g = torch.Generator().manual_seed(rnd)
    return [
        ClientResult(
            k,
            rnd,
            {n: 0.3 * torch.randn(v.shape, generator=g) for n, v in STATE.items()},
            int(torch.randint(1, 51, (1,), generator=g)),
            0.0,
        )
        for k in range(10)
    ]


@pytest.mark.parametrize(
    ("neighbours", "dropout_rate"),
    [("full", 0.0), ("full", 0.3), (4, 0.1), ("auto", 0.1)],
)
def test_secure_mean_equals_fedavg_mean_of_included_clients(
    neighbours: str | int, dropout_rate: float
) -> None:
    algorithm = _algorithm(
        bits=40, clip_range=2.0, neighbours=neighbours, dropout_rate=dropout_rate
    )
    for rnd in (1, 2):
        before = algorithm.global_state
        results = _results(rnd)
        algorithm.aggregate(rnd, results)
        included = [r for r in results if r.client_id in algorithm.last_included]
        assert len(included) >= 6 or algorithm.global_state is before
        if algorithm.global_state is before:
            continue  # aborted: too few clients left
        expected = weighted_average(
            [{n: t.clamp(-2, 2) for n, t in r.update.items()} for r in included],
            [float(r.num_examples) for r in included],
            STATE,
        )
        for name in STATE:
            got = algorithm.global_state[name] - before[name]
            assert torch.allclose(got, expected[name], atol=1e-6)
    metrics = algorithm.take_metrics()
    assert metrics["secagg_bytes_up"] > 0 and metrics["secagg_expansion"] > 0


def test_round_below_threshold_keeps_the_model() -> None:
    algorithm = _algorithm(dropout_rate=0.95)
    before = algorithm.global_state
    algorithm.aggregate(1, _results(1))
    assert algorithm.global_state is before
    metrics = algorithm.take_metrics()
    assert metrics["secagg_aborted"] == 1
    assert metrics["secagg_bytes_up"] > 0  # what was sent before the round stopped


def test_update_from_another_round_refused() -> None:
    from veil.errors import UpdateError

    with pytest.raises(UpdateError, match="for round 1 during round 2"):
        _algorithm().aggregate(2, _results(1))


def test_bits_too_small_for_the_round_refused() -> None:
    with pytest.raises(ConfigError, match=r"'secagg\.bits': bits must be at least 5"):
        _algorithm(bits=4)


def test_odd_neighbours_refused() -> None:
    with pytest.raises(ConfigError, match="even number"):
        parse_config({"secagg": {"neighbours": 3}})


CONFIG = """
name = "tiny-secagg"
seed = 1
methods = ["fedavg"]
[data]
dataset = "tiny"
num_clients = 6
[model]
name = "tanh-cnn"
[local]
lr = 0.1
batch_size = 20
[fedavg]
rounds = 2
client_fraction = 1.0
secure_aggregation = SECURE
[secagg]
bits = 48
clip_range = 10.0
"""


def test_veil_run_secure_fedavg_matches_plain_fedavg(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    models = {}
    for secure in ("false", "true"):
        config = parse_config(tomllib.loads(CONFIG.replace("SECURE", secure)))
        run_dir = run_experiment(config, run_dir=tmp_path / secure, progress=False)
        models[secure] = load_file(run_dir / "models" / "fedavg.safetensors")
        records = [
            json.loads(x)
            for x in (run_dir / "metrics.jsonl").read_text().split("\n")
            if x
        ]
    for name, plain in models["false"].items():
        assert torch.allclose(models["true"][name], plain, atol=1e-5)
    last = records[-1]
    assert last["secagg_clients"] == 6
    assert last["secagg_dropped"] == last["secagg_aborted"] == 0
    # 48-bit codes travel as 8 bytes each against 4 of a float32: about 2x
    assert 1.9 < last["secagg_expansion"] < 2.3


def test_max_examples_below_the_largest_client_refused(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    raw = tomllib.loads(CONFIG.replace("SECURE", "true"))
    raw["secagg"]["max_examples"] = 10
    with pytest.raises(ConfigError, match="max_examples"):
        run_experiment(parse_config(raw), run_dir=tmp_path / "r", progress=False)


def test_noise_added_to_the_codes_reaches_the_sum_exactly() -> None:
    """The hook for distributed DP: integer noise a client adds to its codes before
    masking is in the unmasked sum, exactly (the server never sees one client's)."""
    from veil.secagg import secure_sum

    class Noisy(SecureFedAvg):
        def client_input(self, result: ClientResult) -> np.ndarray:
            codes = super().client_input(result)
            noise = np.full(codes.shape, 1000 + result.client_id, codes.dtype)
            return codes + noise

    algorithm = Noisy(
        global_state={k: v.clone() for k, v in STATE.items()},
        num_clients=4,
        client_fraction=1.0,
        trainer=SGDTrainer(0.1, 1, 10),
        secagg=SecAggConfig(bits=40),
        max_examples=50,
    )
    results = _results(1)[:4]
    inputs = {r.client_id: algorithm.client_input(r) for r in results}
    total = secure_sum(inputs, 40).total
    plain = sum(SecureFedAvg.client_input(algorithm, r).astype(object) for r in results)
    noise = sum(1000 + c for c in range(4))
    assert [int(v) for v in total] == [(int(p) + noise) % 2**40 for p in plain]
