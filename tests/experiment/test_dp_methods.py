"""`central-dp` and FedAvg with DP-SGD clients, end to end through `veil run`."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from veil.data import FederatedDataset
from veil.errors import ConfigError
from veil.experiment import parse_config, run_experiment
from veil.experiment._dp import read_privacy
from veil.privacy import PrivacyLedger, dpsgd_epsilon

BASE = """
name = "tiny-dp"
seed = 1
methods = ["central-dp", "fedavg"]
[data]
dataset = "tiny"
num_clients = 6
[model]
name = "2nn"
[local]
lr = 0.5
batch_size = 20
[fedavg]
rounds = 2
client_fraction = 0.5
local_dp = true
[central_dp]
epochs = 3
expected_batch_size = 60
lr = 0.5
"""


def _records(run_dir: Path) -> list[dict]:
    return [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().split("\n") if x
    ]


def test_calibrated_runs_spend_at_most_the_budget(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    config = parse_config(
        tomllib.loads(BASE + "[dp]\nepsilon = 2.0\ndelta = 1e-4\nclipping_norm = 1.0\n")
    )
    run_dir = run_experiment(config, run_dir=tmp_path / "run", progress=False)

    privacy = read_privacy(run_dir)
    central = privacy["central-dp"]
    # 3 epochs of round(600 / 60) = 10 steps at q = 0.1, noise calibrated to the budget.
    assert central["steps"] == 30
    (z,) = central["noise_multiplier"]
    assert central["epsilon"] == pytest.approx(
        dpsgd_epsilon(z, 0.1, 30, 1e-4), rel=1e-9
    )
    assert 1.9 < central["epsilon"] <= 2.0
    fedavg = privacy["fedavg"]
    assert fedavg["epsilon"] <= 2.0
    assert fedavg["clients_trained"] >= 3
    records = _records(run_dir)
    assert [r["epsilon"] for r in records if r["method"] == "central-dp"] == sorted(
        r["epsilon"] for r in records if r["method"] == "central-dp"
    )
    report = (run_dir / "report.md").read_text()
    assert "## Privacy" in report and "one example of one client" in report


def test_budget_stops_central_dp_before_it_is_exceeded(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    # Noise fixed and too small for three epochs under epsilon 1: training stops.
    config = parse_config(
        tomllib.loads(
            BASE.replace('"central-dp", "fedavg"', '"central-dp"')
            + "[dp]\nnoise_multiplier = 0.8\nepsilon = 1.0\ndelta = 1e-4\n"
        )
    )
    run_dir = run_experiment(config, run_dir=tmp_path / "run", progress=False)

    rows = [r for r in _records(run_dir) if r["method"] == "central-dp"]
    assert rows[-1]["stopped"] == "budget"
    assert len(rows) < 3
    data = json.loads((run_dir / "privacy" / "central-dp.json").read_text())
    ledger = PrivacyLedger.from_dict(data["ledger"])
    spent = ledger.epsilon(1e-4)
    assert spent <= 1.0
    # The ledger stopped at the last affordable step: one more would exceed it.
    steps = sum(e.count for e in ledger.events)
    assert dpsgd_epsilon(0.8, 0.1, steps + 1, 1e-4) > 1.0
    assert "stopped at epoch" in (run_dir / "report.md").read_text()


def test_dp_methods_need_a_dp_section(tiny_dataset: FederatedDataset) -> None:
    with pytest.raises(ConfigError, match=r"need a \[dp\] section"):
        parse_config(tomllib.loads(BASE))


def test_dp_section_needs_noise_or_budget(tiny_dataset: FederatedDataset) -> None:
    with pytest.raises(ConfigError, match="give noise_multiplier, epsilon"):
        parse_config(tomllib.loads(BASE + "[dp]\nclipping_norm = 1.0\n"))


def test_unknown_dp_key_lists_the_allowed_keys(
    tiny_dataset: FederatedDataset,
) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'dp.sigma'.*noise_multiplier"):
        parse_config(tomllib.loads(BASE + "[dp]\nepsilon = 1.0\nsigma = 1.0\n"))


def test_budget_stops_fedavg_with_every_client_within_it(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    text = BASE.replace('"central-dp", "fedavg"', '"fedavg"').replace(
        "rounds = 2", "rounds = 6"
    )
    config = parse_config(
        tomllib.loads(
            text + "[dp]\nnoise_multiplier = 1.5\nepsilon = 2.5\ndelta = 1e-4\n"
            'accountant = "rdp"\n'
        )
    )
    run_dir = run_experiment(config, run_dir=tmp_path / "run", progress=False)

    rows = _records(run_dir)
    assert rows[-1]["stopped"] == "budget"
    assert 1 <= rows[-1]["round"] < 6
    data = json.loads((run_dir / "privacy" / "fedavg.json").read_text())
    for raw in data["clients"].values():
        assert PrivacyLedger.from_dict(raw).epsilon(1e-4) <= 2.5
    assert "stopped at round" in (run_dir / "report.md").read_text()
