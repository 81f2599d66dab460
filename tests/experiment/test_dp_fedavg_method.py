"""`dp-fedavg` end to end through `veil run`: calibration to the budget, the
ledger's epsilon against the accountant's direct answer, the report's sections."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
import torch

from veil.data import FederatedDataset
from veil.errors import ConfigError, PrivacyError
from veil.experiment import parse_config, run_experiment
from veil.experiment._dp import read_privacy
from veil.learning import ClientTask, DPFedAvg
from veil.privacy import PrivacyEvent, PrivacyLedger, dpsgd_epsilon, epsilon_of_event

pytestmark = pytest.mark.filterwarnings("ignore::veil.privacy.InsecureNoiseWarning")

BASE = """
name = "tiny-dp-fedavg"
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
"""


@pytest.fixture(autouse=True)
def one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x]


def test_poisson_run_spends_the_calibrated_budget(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    section = (
        "[dp_fedavg]\nrounds = 3\nsample_rate = 0.25\nepsilon = 4.0\n"
        "adaptive_clipping = true\nplacement = 'distributed'\naccountant = 'rdp'\n"
    )
    config = parse_config(tomllib.loads(BASE + section))
    run_dir = run_experiment(config, run_dir=tmp_path / "run", progress=False)

    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    z = records[-1]["noise_multiplier"]
    # Default delta 0.1 / N; the ledger's epsilon is the accountant's direct answer.
    assert records[-1]["delta"] == pytest.approx(0.005)
    assert records[-1]["epsilon"] == pytest.approx(
        dpsgd_epsilon(z, 0.25, 3, 0.005, "rdp"), rel=1e-9
    )
    assert records[-1]["epsilon"] <= 4.0
    assert records[0]["clipping_norm"] == 1.0  # the initial S, then adapted
    assert records[-1]["clipping_norm"] != 1.0

    privacy = read_privacy(run_dir)["dp-fedavg"]
    assert privacy["protects"] == "one client"
    assert privacy["trust_model"] == "distributed"
    report = (run_dir / "report.md").read_text()
    assert "one client (distributed noise)" in report
    assert "privacy.png" in report and (run_dir / "privacy.png").exists()


def test_fixed_size_run_is_accounted_with_rdp_replace_one(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    section = (
        "[dp_fedavg]\nrounds = 2\nsampling = 'fixed'\nsample_rate = 0.25\n"
        "noise_multiplier = 2.0\ndelta = 1e-3\n"
    )
    config = parse_config(tomllib.loads(BASE + section))
    run_dir = run_experiment(config, run_dir=tmp_path / "run", progress=False)

    data = json.loads((run_dir / "privacy" / "dp-fedavg.json").read_text())
    ledger = PrivacyLedger.from_dict(data["ledger"])
    assert (ledger.accountant, ledger.relation) == ("rdp", "replace_one")
    (event,) = ledger.events
    assert (event.population, event.sample_size, event.count) == (20, 5, 2)
    z = _records(run_dir)[-1]["noise_multiplier"]
    direct = epsilon_of_event(
        PrivacyEvent("gaussian", z / 2, 0.25, 2, population=20).to_dp_event(),
        1e-3,
        "rdp",
        "replace_one",
    )
    assert ledger.epsilon(1e-3) == pytest.approx(direct)


def test_delta_must_be_below_one_over_the_clients(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    section = "[dp_fedavg]\nnoise_multiplier = 1.0\ndelta = 0.1\n"
    config = parse_config(tomllib.loads(BASE + section))
    with pytest.raises(PrivacyError, match="below 1 / num_clients"):
        run_experiment(config, run_dir=tmp_path / "run", progress=False)


def test_dp_fedavg_needs_its_section(tiny_dataset: FederatedDataset) -> None:
    with pytest.raises(ConfigError, match="dp_fedavg"):
        parse_config(tomllib.loads(BASE))
    with pytest.raises(ConfigError, match="noise_multiplier, epsilon"):
        parse_config(tomllib.loads(BASE + "[dp_fedavg]\nrounds = 2\n"))


def test_a_diverged_client_stops_the_run_and_keeps_the_ledger(
    tiny_dataset: FederatedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit = DPFedAvg.client_fit

    def diverge_in_round_2(self: DPFedAvg, task: ClientTask, *args: object) -> object:
        result = fit(self, task, *args)  # type: ignore[arg-type]
        if task.round == 2:
            result.update["1.weight"][0, 0] = math.nan
        return result

    monkeypatch.setattr(DPFedAvg, "client_fit", diverge_in_round_2)
    section = "[dp_fedavg]\nrounds = 3\nsample_rate = 0.5\nnoise_multiplier = 1.0\n"
    config = parse_config(tomllib.loads(BASE + section))
    run_dir = run_experiment(config, run_dir=tmp_path / "run", progress=False)

    last = _records(run_dir)[-1]
    assert (last["round"], last["stopped"]) == (1, "refused")
    data = json.loads((run_dir / "privacy" / "dp-fedavg.json").read_text())
    assert PrivacyLedger.from_dict(data["ledger"]).events[0].count == 1
    assert "updates were refused" in (run_dir / "report.md").read_text()
