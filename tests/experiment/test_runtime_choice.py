"""``runtime`` in the config: the same run on the simulation and Ray runtimes.

One local Ray (2 CPUs) serves the module, so its worker processes start once; veil
joins it instead of starting its own.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from veil.cli import app
from veil.data import FederatedDataset
from veil.errors import ConfigError
from veil.experiment import parse_config, run_experiment
from veil.experiment.config import with_ray_address

CONFIG = """
name = "tiny-runtime"
seed = 2
methods = {methods}
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
secure_aggregation = {secure}
[ray]
num_cpus = 2
"""

# Every federated method, as it runs on Ray: plain FedAvg, FedAvg under secure
# aggregation (clients drop out), DP-FedAvg with adaptive clipping and distributed
# noise, without and with secure aggregation; DSSGD's two synchronous orders, the
# random one with partial downloads (random tie-breaks) and DP uploads (Laplace
# noise, ledgers kept by the clients).
METHODS = {
    "fedavg": ('["fedavg"]', "false", ""),
    "secagg": ('["fedavg"]', "true", "[secagg]\ndropout_rate = 0.3\n"),
    "dp-fedavg": (
        '["dp-fedavg"]',
        "false",
        "[dp_fedavg]\nrounds = 2\nsample_rate = 0.5\nnoise_multiplier = 1.0\n"
        "adaptive_clipping = true\nplacement = 'distributed'\n",
    ),
    "secure-dp-fedavg": (
        '["dp-fedavg"]',
        "false",
        "[dp_fedavg]\nrounds = 2\nsample_rate = 0.5\nnoise_multiplier = 1.0\n"
        "adaptive_clipping = true\nplacement = 'distributed'\n"
        "secure_aggregation = true\n[secagg]\ndropout_rate = 0.2\n",
    ),
    "dssgd-round-robin": (
        '["dssgd"]',
        "false",
        "[dssgd]\nrounds = 2\nlocal_batches = 2\nupload_fraction = 0.1\n",
    ),
    "dssgd-dp": (
        '["dssgd"]',
        "false",
        "[dssgd]\nrounds = 2\nlocal_batches = 2\norder = 'random'\n"
        "upload_fraction = 0.01\ndownload_fraction = 0.3\n"
        "selection = 'threshold'\nbound = 0.01\n"
        "[dssgd.dp]\nepsilon_per_parameter = 0.5\n",
    ),
}


def _config(runtime: str, case: str = "fedavg") -> str:
    methods, secure, extra = METHODS[case]
    return CONFIG.format(runtime=runtime, methods=methods, secure=secure) + extra


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _accuracies(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["accuracy"] for line in lines]


@pytest.mark.filterwarnings("ignore::veil.privacy.InsecureNoiseWarning")
@pytest.mark.parametrize("case", sorted(METHODS))
def test_ray_run_matches_simulation_run(
    case: str, local_ray: None, tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    runs = {}
    for runtime in ("simulation", "ray"):
        config = parse_config(tomllib.loads(_config(runtime, case)))
        runs[runtime] = run_experiment(
            config, run_dir=tmp_path / runtime, progress=False
        )
    assert ray.is_initialized()  # a Ray veil did not start is left running
    assert _accuracies(runs["ray"]) == _accuracies(runs["simulation"])
    method = "dp-fedavg" if case.endswith("dp-fedavg") else "fedavg"
    method = "dssgd" if case.startswith("dssgd") else method
    model = Path("models") / f"{method}.safetensors"
    assert (runs["ray"] / model).read_bytes() == (
        runs["simulation"] / model
    ).read_bytes()
    if case == "dssgd-dp":  # the ledgers came back from the workers, unchanged
        ledgers = Path("privacy") / "dssgd.json"
        assert (runs["ray"] / ledgers).read_text() == (
            runs["simulation"] / ledgers
        ).read_text()


def test_asynchronous_dssgd_is_refused_on_ray(tiny_dataset: FederatedDataset) -> None:
    text = _config("ray", "dssgd-round-robin") + "order = 'async'\n"
    with pytest.raises(ConfigError, match=r"'async' runs only with runtime"):
        parse_config(tomllib.loads(text))


def test_unknown_runtime_names_the_choices() -> None:
    with pytest.raises(
        ConfigError, match=r"'runtime'.*'simulation', 'ray' or 'network'"
    ):
        parse_config(tomllib.loads(_config("pigeon")))


def test_bad_ray_setting_is_named() -> None:
    text = _config("ray") + "cpus_per_client = 0\n"  # under [ray], the last table
    with pytest.raises(ConfigError, match=r"'ray.cpus_per_client'"):
        parse_config(tomllib.loads(text))


def test_ray_address_joins_a_cluster_and_is_validated(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    config = parse_config(tomllib.loads(_config("simulation", "dssgd-round-robin")))
    on_cluster = with_ray_address(config, "ray://head:10001")
    assert (on_cluster.runtime, on_cluster.ray.address) == ("ray", "ray://head:10001")
    assert on_cluster.ray.num_cpus == config.ray.num_cpus

    path = tmp_path / "async.toml"
    path.write_text(_config("simulation", "dssgd-round-robin") + "order = 'async'\n")
    result = CliRunner().invoke(app, ["run", str(path), "--ray-address", "auto"])
    assert result.exit_code == 2
    assert "'async' runs only with runtime" in result.output
