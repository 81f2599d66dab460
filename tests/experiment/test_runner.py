"""End to end: a tiny config through `veil run`, its run directory and report."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from veil.cli import app
from veil.data import FederatedDataset
from veil.experiment import parse_config, run_experiment
from veil.experiment.rundir import RECORD_KEYS

TINY = """
name = "tiny"
seed = 3
methods = ["fedavg", "centralized", "standalone"]
target_accuracy = 0.5
[data]
dataset = "tiny"
num_clients = 10
[local]
lr = 0.1
epochs = 3
[fedavg]
rounds = 4
client_fraction = 0.3
[centralized]
epochs = 2
[standalone]
epochs = 2
max_clients = 4
"""


def test_run_directory_is_complete(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    config_path = tmp_path / "tiny.toml"
    config_path.write_text(TINY)
    result = CliRunner().invoke(
        app, ["run", str(config_path), "--out", str(tmp_path), "-q"]
    )
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for name in [
        "config.toml",
        "metrics.jsonl",
        "report.md",
        "summary.json",
        "accuracy.png",
    ]:
        assert (run_dir / name).exists(), name

    records = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(set(RECORD_KEYS) <= set(r) for r in records)
    fedavg = [r for r in records if r["method"] == "fedavg"]
    assert [r["round"] for r in fedavg] == [1, 2, 3, 4]
    assert all(r["clients"] == 3 and r["bytes_up"] > 0 for r in fedavg)
    assert fedavg[-1]["accuracy"] > 0.5  # learns the tiny task
    (standalone,) = [r for r in records if r["method"] == "standalone"]
    assert (
        standalone["accuracy_min"]
        <= standalone["accuracy"]
        <= standalone["accuracy_max"]
    )

    model = load_file(run_dir / "models" / "fedavg.safetensors")
    assert set(model) == {
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
        "5.weight",
        "5.bias",
    }
    report = (run_dir / "report.md").read_text()
    assert "FedAvg" in report and "Centralized" in report and "Standalone" in report

    # The report is rebuilt from the directory alone.
    (run_dir / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0 and (run_dir / "report.md").read_text() == report


def test_same_seed_same_final_model(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    import tomllib

    config = parse_config(tomllib.loads(TINY) | {"methods": ["fedavg"]})
    a = run_experiment(config, run_dir=tmp_path / "a", progress=False)
    b = run_experiment(config, run_dir=tmp_path / "b", progress=False)
    ma = load_file(a / "models" / "fedavg.safetensors")
    mb = load_file(b / "models" / "fedavg.safetensors")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[fedavg]\nrouds = 3\n")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "bad.toml")])
    assert result.exit_code == 2
    assert "unknown key 'fedavg.rouds'" in result.output
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory" in result.output
    result = CliRunner().invoke(
        app, ["run", str(tmp_path / "bad.toml"), "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2


def test_report_refuses_a_damaged_run_directory(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    config = tmp_path / "config.toml"
    for text, expected in [
        ("name = [unclosed", "not valid TOML"),
        ('name = "x"\nseed = 0\n[data]\ndataset = "mnist"\n', "lacks data.partition"),
        ('name = "x"\nseed = 0\ndata = 3\n[model]\nname = "2nn"\n', "data.dataset"),
    ]:
        config.write_text(text)
        result = CliRunner().invoke(app, ["report", str(tmp_path)])
        assert result.exit_code == 2, result.output
        assert expected in result.output and "Traceback" not in result.output
        assert not (tmp_path / "report.md").exists()


def test_report_rebuilds_a_private_inference_run(tmp_path: Path) -> None:
    import shutil

    source = Path(__file__).parents[2] / "docs" / "results" / "inference-phishing"
    shutil.copytree(source, tmp_path / "run")
    written = (tmp_path / "run" / "report.md").read_text()
    (tmp_path / "run" / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "report.md").read_text() == written

    (tmp_path / "run" / "results.json").write_text("{}")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 2 and "results.json" in result.output
