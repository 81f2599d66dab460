"""DSSGD with real processes on loopback (slow): the runner's ``runtime =
"network"`` against the simulation, and ``veil serve`` / ``veil join`` with the
server SIGKILLed mid-run and restarted."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from tests.network.test_loopback import Deployment, deployment  # noqa: F401
from veil.experiment import parse_config, run_experiment

CONFIG = """
name = "dssgd-loopback"
seed = 5
methods = ["dssgd"]
runtime = "{runtime}"
[data]
dataset = "tuandromd"
num_clients = {clients}
[model]
name = "tuandromd-mlp"
[local]
batch_size = 20
[dssgd]
rounds = {rounds}
upload_fraction = 0.1
download_fraction = {download}
order = "{order}"
local_batches = 3
{dp}
[network]
round_timeout = 600
devices = {devices}
"""
DP = """selection = "threshold"
threshold = 0.0001
bound = 0.01
[dssgd.dp]
epsilon_per_parameter = 2.0
"""


def config_text(**values: Any) -> str:
    defaults = dict(
        runtime="simulation",
        clients=6,
        rounds=2,
        download=1.0,
        order="round_robin",
        dp="",
        devices=3,
    )
    return CONFIG.format(**{**defaults, **values})


def metrics(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


SAME = (
    "accuracy",
    "loss",
    "train_loss",
    "bytes_up",
    "bytes_down",
    "uploads",
    "staleness_max",
    "uploaded_per_turn",
    "epsilon",
    "epsilon_pure",
    "uploads_max",
)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::veil.privacy.InsecureNoiseWarning")
@pytest.mark.parametrize(
    ("order", "download", "dp"),
    [("round_robin", 1.0, ""), ("random", 0.5, DP)],
    ids=["round-robin", "random-dp"],
)
def test_network_runtime_equals_simulation(
    tmp_path: Path, order: str, download: float, dp: str
) -> None:
    runs = {}
    for runtime in ("simulation", "network"):
        text = config_text(runtime=runtime, order=order, download=download, dp=dp)
        runs[runtime] = run_experiment(
            parse_config(tomllib.loads(text)),
            run_dir=tmp_path / runtime,
            progress=False,
        )
    model = Path("models") / "dssgd.safetensors"
    assert (runs["network"] / model).read_bytes() == (
        runs["simulation"] / model
    ).read_bytes()
    net, sim = metrics(runs["network"]), metrics(runs["simulation"])
    assert len(net) == len(sim) == 2
    for a, b in zip(net, sim, strict=True):
        assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}
    if dp:
        ledgers = Path("privacy") / "dssgd.json"
        assert json.loads((runs["network"] / ledgers).read_text()) == json.loads(
            (runs["simulation"] / ledgers).read_text()
        )


@pytest.mark.slow
def test_async_over_processes_loses_no_upload(tmp_path: Path) -> None:
    text = config_text(runtime="network", order="async", rounds=3, devices=6)
    run = run_experiment(
        parse_config(tomllib.loads(text)), run_dir=tmp_path / "run", progress=False
    )
    rows = metrics(run)
    assert [r["uploads"] for r in rows] == [6, 12, 18]
    assert sum(r["turns"] for r in rows) == 18


@pytest.mark.slow
def test_serve_killed_mid_run_resumes_and_ends_as_the_simulation(
    deployment: Callable[[str], Deployment],  # noqa: F811
    tmp_path: Path,
) -> None:
    text = config_text(rounds=4, download=0.5, order="random")
    d = deployment(text)
    d.serve()
    for clients in ("0-1", "2-3", "4-5"):
        d.join(clients)
    d.wait_for(lambda s: s.get("turns_applied", 0) >= 9, 180)
    assert d.server is not None
    os.kill(d.server.pid, signal.SIGKILL)
    d.server.wait()
    db = sqlite3.connect(d.folder / "state" / "dssgd.sqlite")
    applied = db.execute(
        "SELECT COUNT(*) FROM turns WHERE status = 'applied'"
    ).fetchone()[0]
    version = db.execute("SELECT version FROM state").fetchone()[0]
    db.close()
    assert applied == version >= 9  # every accepted upload is on disk
    time.sleep(1.0)  # devices see the server gone and back off
    d.serve()
    d.finish(seconds=300)
    assert d.server.returncode == 0
    assert "restored" in (d.folder / "server.log").read_text()

    simulation = run_experiment(
        parse_config(tomllib.loads(text)), run_dir=tmp_path / "sim", progress=False
    )
    expected = load_file(simulation / "models" / "dssgd.safetensors")
    final = load_file(d.folder / "state" / "final.safetensors")
    assert final.keys() == expected.keys()
    for name in final:
        assert (final[name] == expected[name]).all(), name
    db = sqlite3.connect(d.folder / "state" / "dssgd.sqlite")
    assert db.execute(
        "SELECT COUNT(*) FROM turns WHERE status = 'applied'"
    ).fetchone() == (24,)
