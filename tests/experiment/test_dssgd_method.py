"""`veil run` method dssgd: the asynchronous order, metrics, models, report and
privacy records, on the tiny dataset."""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from veil.data import FederatedDataset, partition
from veil.experiment import parse_config, run_experiment
from veil.experiment._dssgd import _new_run
from veil.experiment.rundir import MetricsLog
from veil.experiment.runner import RunContext, initial_state
from veil.learning.dssgd import ParameterServer, Upload, flatten
from veil.models import build_model

TINY_DSSGD = {
    "name": "tiny-dssgd",
    "seed": 1,
    "methods": ["dssgd"],
    "data": {"dataset": "tiny", "num_clients": 5},
    "local": {"lr": 0.1, "batch_size": 10},
}


class RecordingServer(ParameterServer):
    """A parameter server that also keeps every upload it applied."""

    def __init__(self, parameters: torch.Tensor, num_clients: int) -> None:
        super().__init__(parameters, num_clients)
        self.applied: list[Upload] = []
        self._record_lock = threading.Lock()

    def apply(self, upload: Upload) -> int:
        staleness = super().apply(upload)
        with self._record_lock:
            self.applied.append(upload)
        return staleness


def test_asynchronous_run_loses_no_upload(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    config = parse_config(
        {
            **TINY_DSSGD,
            "dssgd": {"order": "async", "workers": 3, "local_batches": 3},
        }
    )
    clients = partition(
        "iid", tiny_dataset.train.y.numpy(), 5, np.random.default_rng(0)
    )
    ctx = RunContext(
        config,
        tiny_dataset,
        clients,
        initial_state(config),
        MetricsLog(tmp_path / "m.jsonl"),
    )
    run = _new_run(ctx, 0.2)
    start = flatten(ctx.initial_state)
    run.server = RecordingServer(start, 5)
    stats = [t for rnd in range(1, 5) for t in run.run_round(rnd)]

    assert len(stats) == 20 == run.server.version == len(run.server.applied)
    uploaded = sum(t.uploaded for t in stats)
    assert int(run.server.counts().sum()) == uploaded > 0
    expected = start.double()
    for upload in run.server.applied:
        expected[upload.vector.positions()] += upload.vector.values.double()
    torch.testing.assert_close(
        run.server.parameters().double(), expected, atol=1e-5, rtol=0
    )
    assert max(t.staleness for t in stats) <= 4 * 5 - 1


def test_dssgd_runs_per_upload_fraction_with_report(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    config = parse_config(
        {
            **TINY_DSSGD,
            "dssgd": {"rounds": 2, "upload_fraction": [1.0, 0.01], "local_batches": 6},
        }
    )
    run_dir = run_experiment(config, run_dir=tmp_path / "run", progress=False)
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    by = {r["method"]: r for r in records}
    full, sparse = by["dssgd-u1"], by["dssgd-u0.01"]
    assert full["accuracy"] > 0.5  # the tiny task is learned
    assert full["turns"] == 5 and full["uploaded_per_turn"] == full["parameters"]
    assert sparse["uploaded_per_turn"] == 1993
    assert sparse["upload_bytes_per_turn"] <= 0.025 * sparse["dense_upload_bytes"]
    assert full["staleness_max"] == 0  # round robin: nobody uploads in between
    for name in ("dssgd", "dssgd-u1", "dssgd-u0.01"):
        assert (run_dir / "models" / f"{name}.safetensors").exists()
    report = (run_dir / "report.md").read_text()
    assert "## Distributed selective SGD" in report
    assert "| dssgd-u0.01 | 0.01 | 1 | round_robin |" in report


@pytest.mark.filterwarnings("ignore::veil.privacy.InsecureNoiseWarning")
def test_dp_dssgd_writes_ledgers_and_states_the_composition(
    tiny_dataset: FederatedDataset, tmp_path: Path
) -> None:
    config = parse_config(
        {
            **TINY_DSSGD,
            "dssgd": {
                "rounds": 2,
                "local_batches": 2,
                "upload_fraction": 0.001,
                "selection": "threshold",
                "bound": 0.01,
                "dp": {"epsilon_per_parameter": 0.5},
            },
        }
    )
    run_dir = run_experiment(config, run_dir=tmp_path / "run", progress=False)
    last = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ][-1]
    capacity = 200  # ceil(0.001 * 199210)
    assert last["epsilon_upload"] == pytest.approx(capacity * 0.5)
    assert last["uploads_max"] == 2
    # Two uploads: the pure sum is at most twice the per-upload epsilon.
    assert 0 < last["epsilon_pure"] <= 2 * capacity * 0.5 + 1e-9
    assert last["epsilon"] > 0
    ledgers = json.loads((run_dir / "privacy" / "dssgd.json").read_text())
    assert set(ledgers["clients"]) == {"0", "1", "2", "3", "4"}
    report = (run_dir / "report.md").read_text()
    assert "What DSSGD's differential privacy spends" in report
    assert "not a guarantee for anyone" in report


def test_dp_config_needs_threshold_selection_and_bound() -> None:
    from veil.errors import ConfigError

    with pytest.raises(ConfigError, match="needs selection = 'threshold'"):
        parse_config({"dssgd": {"dp": {"epsilon_per_parameter": 1.0}}})


def test_asynchronous_order_runs_only_in_the_simulation(
    tiny_dataset: FederatedDataset,
) -> None:
    from veil.errors import ConfigError
    from veil.experiment._dssgd import check_runtime
    from veil.runtime import SimulationRuntime

    class ElsewhereRuntime:
        """Stands for any runtime that runs clients out of this process."""

    with pytest.raises(ConfigError, match="got 'async'"):
        check_runtime("async", ElsewhereRuntime())
    check_runtime("random", ElsewhereRuntime())  # synchronous orders run anywhere
    model_fn = functools.partial(build_model, "2nn")
    parts = np.array_split(np.arange(20), 2)
    check_runtime("async", SimulationRuntime(model_fn, tiny_dataset.train, parts))
