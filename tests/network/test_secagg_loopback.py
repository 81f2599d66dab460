"""Secure aggregation with real processes on loopback (slow): the runner's
``runtime = "network"`` with device processes gives the simulation's model bit for
bit, and a server SIGKILLed in the middle of the protocol restarts, fails that
round with the reason and finishes the run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.network.test_loopback import Deployment, config_text, deployment, open_round
from veil.experiment import parse_config, run_experiment

__all__ = ["deployment"]  # the fixture, used by the tests below


def secure_config(**values: object) -> str:
    text = config_text(**values)
    text = text.replace("[fedavg]\n", "[fedavg]\nsecure_aggregation = true\n")
    text = text.replace("[dp_fedavg]\n", '[dp_fedavg]\nplacement = "distributed"\n'
                        "secure_aggregation = true\n")  # fmt: skip
    return text + "[secagg]\nclip_range = 0.5\nstep_timeout = 30\n"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedavg", "dp-fedavg"])
def test_secure_network_runtime_equals_simulation(tmp_path: Path, method: str) -> None:
    """Three `veil join` processes, 5 of 10 clients a round, secure aggregation:
    the model is the simulation's, bit for bit, and the server stored no update."""
    runs = {}
    for runtime in ("simulation", "network"):
        text = secure_config(runtime=runtime, method=method, devices=3)
        config = parse_config(tomllib.loads(text))
        runs[runtime] = run_experiment(
            config, run_dir=tmp_path / runtime, progress=False
        )
    model = Path("models") / f"{method}.safetensors"
    assert (runs["network"] / model).read_bytes() == (
        runs["simulation"] / model
    ).read_bytes()
    rows = [
        json.loads(x)
        for x in (runs["network"] / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["secagg_clients"] for r in rows if "secagg_clients" in r] == [5, 5]


@pytest.mark.slow
def test_server_killed_mid_protocol_fails_that_round_and_finishes(
    deployment: Callable[[str], Deployment],
) -> None:
    """Only devices 0-4 run at first, so round 1 (seed 4 samples clients 0, 1, 2
    and two of 5-9) waits in its key advertisement for the others; should the
    sample change, the wait or the round statuses below fail, not pass. The server
    is SIGKILLed there, with no race against a fast round. Restarted, it fails
    round 1 with the reason; devices 5-9 join and rounds 2 and 3 aggregate."""
    d = deployment(secure_config(rounds=3, timeout=120))
    d.serve()
    d.join("0-4")
    d.wait_for(open_round(1, received=1), 100)  # a key advertised, others missing
    assert d.server is not None
    os.kill(d.server.pid, signal.SIGKILL)
    d.server.wait()
    d.serve()  # same state folder
    d.join("5-9")
    d.finish(seconds=300)
    db = sqlite3.connect(d.folder / "state" / "state.sqlite")
    rows = db.execute(
        "SELECT round, status, reason FROM rounds ORDER BY round"
    ).fetchall()
    assert [(r, s) for r, s, _ in rows] == [
        (1, "failed"), (2, "aggregated"), (3, "aggregated"),
    ]  # fmt: skip
    assert "restarted during the round's secure aggregation" in rows[0][2]
    assert db.execute("SELECT COUNT(*) FROM updates").fetchone() == (0,)
