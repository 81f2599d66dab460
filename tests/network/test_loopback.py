"""Real processes on loopback: a server and device processes talking HTTP(S).

The default run checks the runner's ``runtime = "network"`` with 5 device processes
against the simulation, bit for bit. The slow ones run ``veil serve`` over TLS with
``veil join`` devices, kill a device mid-round, and SIGKILL the server mid-round and
restart it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import load_file

from veil.experiment import parse_config, run_experiment

CONFIG = """
name = "loopback"
seed = 4
methods = ["{method}"]
runtime = "{runtime}"
[data]
dataset = "tuandromd"
num_clients = {clients}
[model]
name = "tuandromd-mlp"
[local]
batch_size = 20
[fedavg]
rounds = {rounds}
client_fraction = {fraction}
[dp_fedavg]
rounds = {rounds}
sampling = "fixed"
sample_rate = {fraction}
clipping_norm = 0.5
noise_multiplier = 1.0
accountant = "rdp"
[network]
round_timeout = {timeout}
min_results = {min_results}
devices = {devices}
"""


def config_text(**values: Any) -> str:
    defaults = dict(
        method="fedavg",
        runtime="simulation",
        clients=10,
        rounds=2,
        fraction=0.5,
        timeout=60,
        min_results=1,
        devices=5,
    )
    return CONFIG.format(**{**defaults, **values})


@pytest.mark.slow
def test_network_runtime_equals_simulation_with_five_devices(tmp_path: Path) -> None:
    """Five `veil join` processes on 127.0.0.1 train 10 clients; the server
    aggregates by client id, so the model is the simulation's, bit for bit."""
    runs = {}
    for runtime in ("simulation", "network"):
        config = parse_config(tomllib.loads(config_text(runtime=runtime)))
        runs[runtime] = run_experiment(
            config, run_dir=tmp_path / runtime, progress=False
        )
    model = Path("models") / "fedavg.safetensors"
    network = (runs["network"] / model).read_bytes()
    assert network == (runs["simulation"] / model).read_bytes()
    sent = [
        line for line in (runs["network"] / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(sent) == 2


# --- veil serve / veil join as separate processes (slow) --------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def veil(*args: str, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 (the process owns it)
    command = [sys.executable, "-m", "veil", "--threads", "1", "-v", *args]
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


class Deployment:
    """`veil certs`, `veil serve` over TLS, and `veil join` devices."""

    def __init__(self, folder: Path, config: str) -> None:
        self.folder = folder
        (folder / "config.toml").write_text(config)
        subprocess.run(
            [sys.executable, "-m", "veil", "certs", "--out", str(folder / "certs")],
            check=True,
            capture_output=True,
        )
        self.cert = folder / "certs" / "cert.pem"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.server: subprocess.Popen[bytes] | None = None
        self.devices: list[subprocess.Popen[bytes]] = []

    def serve(self) -> None:
        self.server = veil(
            "serve", str(self.folder / "config.toml"),
            "--state", str(self.folder / "state"),
            "--port", str(self.port),
            "--cert", str(self.cert),
            "--key", str(self.folder / "certs" / "key.pem"),
            "--linger", "5",
            log=self.folder / "server.log",
        )  # fmt: skip

    def join(self, clients: str, *options: str) -> subprocess.Popen[bytes]:
        p = veil(
            "join", "--server", self.url, "--clients", clients,
            "--ca-file", str(self.cert), *options,
            log=self.folder / f"device-{clients}.log",
        )  # fmt: skip
        self.devices.append(p)
        return p

    def status(self) -> dict[str, Any] | None:
        try:
            trust = ssl.create_default_context(cafile=str(self.cert))
            r = httpx.get(self.url + "/v1/status", verify=trust, timeout=5)
        except httpx.TransportError:
            return None
        return dict(r.json())

    def wait_for(self, what: Callable[[dict[str, Any]], bool], seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            status = self.status()
            if status is not None and what(status):
                return
            time.sleep(0.1)
        raise AssertionError(
            f"timed out; last status {self.status()}; logs in {self.folder}"
        )

    def finish(self, seconds: float = 180) -> None:
        assert self.server is not None
        self.server.wait(timeout=seconds)
        for p in self.devices:
            p.wait(timeout=30)

    def stop(self) -> None:
        for p in [*self.devices, self.server]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Callable[[str], Deployment]]:
    made: list[Deployment] = []

    def make(config: str) -> Deployment:
        made.append(Deployment(tmp_path, config))
        return made[-1]

    yield make
    for d in made:
        d.stop()


def open_round(n: int, received: int = 0) -> Callable[[dict[str, Any]], bool]:
    def check(status: dict[str, Any]) -> bool:
        r = status["open_round"]
        return r is not None and r["round"] == n and r["received"] >= received

    return check


@pytest.mark.slow
def test_a_device_killed_mid_round_does_not_stop_the_run(
    deployment: Callable[[str], Deployment],
) -> None:
    """Every client is picked every round; once a round has aggregated all five,
    one device is killed: later rounds aggregate the other four at the deadline
    (rounds may also fail while the devices warm up, which is what rounds do)."""
    text = config_text(clients=5, fraction=1.0, rounds=6, timeout=20, min_results=3)
    d = deployment(text)
    d.serve()
    victim = d.join("0")
    for k in range(1, 5):
        d.join(str(k))
    d.wait_for(lambda s: s["rounds_aggregated"] >= 1, 300)
    victim.send_signal(signal.SIGKILL)
    d.devices.remove(victim)
    d.finish(seconds=400)
    assert d.server is not None and d.server.returncode == 0
    lines = (d.folder / "state" / "metrics.jsonl").read_text().splitlines()
    clients = [json.loads(line)["clients"] for line in lines]
    assert len(clients) == 6
    assert 5 in clients
    assert clients[-1] == 4  # the killed device's client is missing; the round ran


@pytest.mark.slow
def test_server_killed_mid_round_resumes_and_loses_nothing(
    deployment: Callable[[str], Deployment], tmp_path: Path
) -> None:
    # A long deadline: every round waits for all its clients, so no round fails
    # while the devices start, and the model must be the simulation's.
    text = config_text(
        method="dp-fedavg", clients=6, rounds=3, fraction=0.5, timeout=600
    )
    d = deployment(text)
    d.serve()
    for clients in ("0-1", "2-3", "4-5"):
        d.join(clients)
    d.wait_for(open_round(2, received=1), 120)
    assert d.server is not None
    os.kill(d.server.pid, signal.SIGKILL)
    d.server.wait()
    time.sleep(1.0)  # devices see the server gone and back off
    d.serve()
    d.finish()
    assert d.server.returncode == 0
    # Nothing lost: the model is the simulation's, and every round is in the ledger.
    simulation = run_experiment(
        parse_config(tomllib.loads(text)), run_dir=tmp_path / "sim", progress=False
    )
    expected = load_file(simulation / "models" / "dp-fedavg.safetensors")
    final = load_file(d.folder / "state" / "final.safetensors")
    assert final.keys() == expected.keys()
    for name in final:
        assert (final[name] == expected[name]).all(), name
    log = (d.folder / "server.log").read_text()
    assert "restored" in log
    import sqlite3

    db = sqlite3.connect(d.folder / "state" / "state.sqlite")
    assert db.execute("SELECT COUNT(*) FROM ledger").fetchone() == (3,)
    assert db.execute("SELECT COUNT(*) FROM updates").fetchone() == (9,)
