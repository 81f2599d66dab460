"""`veil attack RUN_DIR`: attacks against a finished run land in its report."""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import make_tiny
from veil.attacks.run import AttackSettings, attack_run
from veil.cli import app
from veil.data import DATASETS
from veil.errors import ConfigError
from veil.experiment import parse_config, run_experiment, write_report
from veil.privacy import dpsgd_epsilon

CONFIG = """
name = "tiny-attack"
seed = 1
methods = ["centralized", "central-dp"]
[data]
dataset = "tiny"
num_clients = 6
[model]
name = "2nn"
[centralized]
epochs = 2
[central_dp]
epochs = 1
expected_batch_size = 60
lr = 0.5
[dp]
noise_multiplier = 1.0
delta = 1e-4
"""


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One tiny run for the whole module (training it is the slow part)."""
    data = make_tiny()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(DATASETS, "tiny", lambda _dir: data)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        config = parse_config(tomllib.loads(CONFIG))
        root = tmp_path_factory.mktemp("attack")
        yield run_experiment(config, run_dir=root / "run", progress=False)
        torch.set_num_threads(threads)


@pytest.fixture
def run_dir(shared_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of the shared run, so tests do not see each other's attacks."""
    copy = tmp_path / "run"
    shutil.copytree(shared_run, copy)
    return copy


def test_attack_run_writes_results_and_report_section(run_dir: Path) -> None:
    settings = AttackSettings(
        victims=1,
        members=100,
        references=1,
        reference_epochs=1,
        iterations=5,
        restarts=1,
    )
    path = attack_run(run_dir, settings)
    data = json.loads(path.read_text())
    views = data["inversion"]["views"]
    assert set(views) == {"undefended", next(v for v in views if "DP-SGD" in v)}
    assert views["undefended"]["label_accuracy"] == 1.0
    models = data["membership"]["models"]
    assert set(models) == {"centralized", "central-dp"}
    dp_report = models["central-dp"][0]
    # 1 epoch of round(600 / 60) = 10 steps at q = 0.1 with z = 1.
    eps = dpsgd_epsilon(1.0, 0.1, 10, 1e-4)
    assert dp_report["epsilon"] == pytest.approx(eps, rel=1e-6)
    assert models["centralized"][0]["epsilon"] is None
    assert [r["attack"] for r in models["central-dp"]] == [
        "loss threshold",
        "calibrated (1 references)",
    ]

    report = write_report(run_dir).read_text()
    assert "## Attacks" in report
    assert "![reconstructions](attacks/inversion.png)" in report
    assert (run_dir / "attacks" / "inversion.png").exists()


def test_report_without_attacks_has_no_section(run_dir: Path) -> None:
    assert "## Attacks" not in (run_dir / "report.md").read_text()


def test_cli_attack(run_dir: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "attack",
            str(run_dir),
            "--victims",
            "0",
            "--members",
            "50",
            "--references",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "membership" in (run_dir / "attacks" / "attacks.json").read_text()
    assert "### Membership inference" in (run_dir / "report.md").read_text()


def test_cli_attack_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["attack", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a run directory" in result.output


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="victims and references must be >= 0"):
        AttackSettings(victims=-1)


def test_veil_attack_targets_the_runs_own_modules() -> None:
    """A run of DSSGD, secure FedAvg and DP-FedAvg is attacked through each
    module's release at the run's settings."""
    from veil.attacks.run import _defences
    from veil.learning.dssgd import decode_sparse, upload_count
    from veil.models import build_model

    config = parse_config(
        tomllib.loads(
            """
name = "modules"
methods = ["fedavg", "dssgd", "dp-fedavg"]
[model]
name = "2nn"
[fedavg]
secure_aggregation = true
[dssgd]
upload_fraction = [0.1, 0.01]
[dp_fedavg]
noise_multiplier = 1.0
clipping_norm = 0.5
"""
        )
    )
    privacy = {"dp-fedavg": {"noise_multiplier": [1.0]}}
    views = _defences(config, privacy)
    torch.manual_seed(0)
    model = build_model("2nn")
    x, y = torch.rand(1, 1, 28, 28), torch.tensor([3])
    size = sum(p.numel() for p in model.parameters())
    for u in (0.1, 0.01):
        release = views[f"DSSGD upload (theta_u={u:g}, largest)"](model, x, y, 0)
        assert release.payload is not None
        assert decode_sparse(release.payload).count == upload_count(u, size)
    names = set(views)
    assert "secure aggregation: masked input" in names
    assert any(n.startswith("DP-FedAvg model release") for n in names)
    assert "DP-FedAvg server's view (central)" in names
