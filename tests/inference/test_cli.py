"""``veil infer``: train, export, serve and query end to end on tiny data."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from typer.testing import CliRunner

from tests.conftest import make_tiny
from veil.cli import app
from veil.data import DATASETS, FederatedDataset
from veil.errors import BudgetExceededError, ConfigError, DataError
from veil.inference import load_split, read_spec
from veil.inference.config import load_inference_config, parse_inference_config
from veil.inference.query import run_query
from veil.inference.service import create_app

CONFIG = """
name = "tiny-inference"
[data]
dataset = "tiny"
max_train = 300
max_test = 50
[model]
features = 8
hidden = 32
[pretrain]
epochs = 1
batch_size = 64
[perturbation]
epsilon = 5.0
[noisy_training]
epochs = 1
batch_size = 64
[report]
epsilons = [50.0]
"""


@pytest.fixture(scope="module")
def tiny() -> Iterator[FederatedDataset]:
    data = make_tiny()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(DATASETS, "tiny", lambda _dir: data)
        yield data


@pytest.fixture(scope="module")
def run_dir(tiny: FederatedDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One training run shared by the module's tests (they only read it)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("infer")
    config = root / "config.toml"
    config.write_text(CONFIG)
    result = CliRunner().invoke(
        app, ["infer", "train", str(config), "--out", str(root / "runs")]
    )
    assert result.exit_code == 0, result.output
    (folder,) = (root / "runs").iterdir()
    return folder


def test_train_writes_parts_results_and_report(run_dir: Path) -> None:
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "device.safetensors",
        "cloud-plain.safetensors",
        "cloud-noisy-eps5.safetensors",
        "cloud-noisy-eps50.safetensors",
        "split-model.json",
        "results.json",
        "report.md",
        "config.toml",
    } <= names
    spec = read_spec(run_dir)
    assert spec.deployed == "noisy-eps5" and spec.clouds["plain"] is None
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["epsilon"] for r in results["rows"]] == [5.0, 50.0]
    assert results["rows"][0]["laplace_scale"] == pytest.approx(2 * 16.0 / 5.0)
    report = (run_dir / "report.md").read_text()
    assert "epsilon-DP" in report and "| 50 |" in report
    split = load_split(run_dir)
    assert set(split.clouds) == {"plain", "noisy-eps5", "noisy-eps50"}


def test_evaluate_remeasures_over_independent_draws(
    run_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    result = CliRunner().invoke(app, ["infer", "evaluate", str(folder), "--draws", "3"])
    assert result.exit_code == 0, result.output
    assert "| 50 |" in result.output
    evaluation = json.loads((folder / "evaluation.json").read_text())
    trained = json.loads((folder / "results.json").read_text())
    # no perturbation: the same test inputs give exactly the training run's baseline
    assert evaluation["baseline_accuracy"] == trained["baseline_accuracy"]
    assert [r["epsilon"] for r in evaluation["rows"]] == [5.0, 50.0]
    for row in evaluation["rows"]:
        for part in ("plain", "noisy"):
            summary = row[part]
            assert len(summary["values"]) == 3
            assert summary["min"] <= summary["mean"] <= summary["max"]
    # the draws are independent perturbations: at epsilon 5 they do not all agree
    low = evaluation["rows"][0]["plain"]["values"]
    assert len(set(low)) > 1
    refused = CliRunner().invoke(
        app, ["infer", "evaluate", str(folder), "--draws", "0"]
    )
    assert refused.exit_code == 2


def test_export_prints_size_parameters_and_latency(run_dir: Path) -> None:
    result = CliRunner().invoke(app, ["infer", "export", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["max_abs_diff"] <= 1e-5
    assert report["size_bytes"] > 0 and report["parameters"] > 0
    assert Path(report["path"]).exists()


def test_serve_builds_the_app_of_the_deployed_cloud_part(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    result = CliRunner().invoke(app, ["infer", "serve", str(run_dir), "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert "noisy-eps5" in result.output and served["port"] == 8123
    info = TestClient(served["app"]).get("/info").json()
    assert info["features"] == 8 and info["num_classes"] == 10


def test_query_round_trip_and_budget_across_calls(
    run_dir: Path, tmp_path: Path
) -> None:
    split = load_split(run_dir, ["noisy-eps5"])
    service = create_app(split.clouds["noisy-eps5"], 8, 10)
    client = TestClient(service)
    ledger = tmp_path / "ledger.json"
    answer = run_query(
        run_dir,
        "http://testserver",
        count=3,
        budget=20.0,
        ledger_path=ledger,
        client=client,
    )
    assert len(answer["predictions"]) == 3 and len(answer["labels"]) == 3
    assert answer["epsilon_spent"] == pytest.approx(15.0)
    assert answer["queries_left"] == 1
    before = ledger.read_text()
    with pytest.raises(BudgetExceededError):
        run_query(
            run_dir,
            "http://testserver",
            count=2,
            budget=20.0,
            ledger_path=ledger,
            client=client,
        )
    assert ledger.read_text() == before  # a refused query spends nothing


def test_query_cli_refuses_over_budget_with_status_2(
    run_dir: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "infer",
            "query",
            str(run_dir),
            "--count",
            "3",
            "--budget",
            "10",
            "--ledger",
            str(tmp_path / "l.json"),
        ],
    )
    assert result.exit_code == 2
    assert "privacy budget" in result.output
    assert not (tmp_path / "l.json").exists()


def test_query_cli_unreachable_cloud_is_status_2(run_dir: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["infer", "query", str(run_dir), "--count", "1", "--url", "http://127.0.0.1:9"],
    )
    assert result.exit_code == 2
    assert "could not be reached" in result.output


def test_bad_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"perturbation\.nullification_rate"):
        parse_inference_config({"perturbation": {"nullification_rate": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown key 'model\.width'"):
        parse_inference_config({"model": {"width": 3}})


def test_missing_run_dir_is_status_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["infer", "export", str(tmp_path)])
    assert result.exit_code == 2
    assert "veil infer train" in result.output


def test_query_reads_inputs_from_safetensors(run_dir: Path, tmp_path: Path) -> None:
    split = load_split(run_dir, ["plain"])
    client = TestClient(create_app(split.clouds["plain"], 8, 10))
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_file({"x": torch.randn(2, 1, 28, 28)}, good)
    save_file({"x": torch.randn(2, 28, 28)}, bad)
    answer = run_query(run_dir, "http://testserver", inputs=good, client=client)
    assert len(answer["predictions"]) == 2 and answer["labels"] is None
    with pytest.raises(DataError, match="shape"):
        run_query(run_dir, "http://testserver", inputs=bad, client=client)
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(DataError, match="safetensors"):
        run_query(
            run_dir,
            "http://testserver",
            inputs=tmp_path / "pickle.safetensors",
            client=client,
        )


@pytest.mark.slow
def test_serve_and_query_over_real_http(run_dir: Path, tmp_path: Path) -> None:
    """`veil infer serve` in its own process, `veil infer query` against it."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    veil = [str(Path(sys.executable).parent / "veil")]
    server = subprocess.Popen(
        [*veil, "infer", "serve", str(run_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(url + "/info", timeout=1.0)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        inputs = tmp_path / "x.safetensors"
        save_file({"x": torch.randn(3, 1, 28, 28)}, inputs)
        ledger = tmp_path / "ledger.json"
        query = [
            *veil,
            "infer",
            "query",
            str(run_dir),
            "--url",
            url,
            "--inputs",
            str(inputs),
            "--budget",
            "20",
            "--ledger",
            str(ledger),
        ]
        done = subprocess.run(query, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert len(answer["predictions"]) == 3 and answer["epsilon_spent"] == 15.0
        again = subprocess.run(query, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "privacy budget" in again.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_bundled_inference_configs_are_valid(repo_root: Path) -> None:
    paths = sorted((repo_root / "experiments" / "inference").glob("*.toml"))
    assert paths
    for path in paths:
        load_inference_config(path)
