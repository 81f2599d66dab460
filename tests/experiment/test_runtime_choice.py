"""``runtime`` in the config: the same run on the simulation and Ray runtimes."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import ray

from veil.data import FederatedDataset
from veil.errors import ConfigError
from veil.experiment import parse_config, run_experiment

CONFIG = """
name = "tiny-runtime"
seed = 2
methods = ["fedavg"]
runtime = "{runtime}"
[data]
dataset = "tiny"
num_clients = 6
[model]
name = "2nn"
[local]
batch_size = 20
[fedavg]
rounds = 2
client_fraction = 0.5
[ray]
num_cpus = 2
"""


def _accuracies(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["accuracy"] for line in lines]


def test_ray_run_matches_simulation_run(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    runs = {}
    for runtime in ("simulation", "ray"):
        config = parse_config(tomllib.loads(CONFIG.format(runtime=runtime)))
        runs[runtime] = run_experiment(
            config, run_dir=tmp_path / runtime, progress=False
        )
    assert not ray.is_initialized()  # the local Ray veil started is stopped
    assert _accuracies(runs["ray"]) == _accuracies(runs["simulation"])
    sim = (runs["simulation"] / "models" / "fedavg.safetensors").read_bytes()
    assert (runs["ray"] / "models" / "fedavg.safetensors").read_bytes() == sim


def test_unknown_runtime_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"'runtime'.*'simulation' or 'ray'"):
        parse_config(tomllib.loads(CONFIG.format(runtime="network")))


def test_bad_ray_setting_is_named() -> None:
    text = CONFIG.format(runtime="ray") + "cpus_per_client = 0\n"
    with pytest.raises(ConfigError, match=r"'ray.cpus_per_client'"):
        parse_config(tomllib.loads(text))
