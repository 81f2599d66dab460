"""Helpers for the secure aggregation tests: a secure server on a tiny problem,
driven over its HTTP app by in-process devices, and the simulation to compare with."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from tests.conftest import make_tiny
from tests.network.conftest import bearer, tiny_model_state, tiny_net
from veil.experiment._secagg import SecureFedAvg
from veil.experiment._secure_dp_fedavg import SecureDPFedAvg
from veil.experiment.config import SecAggConfig
from veil.learning import DPFedAvg, FedAvg, SGDTrainer
from veil.learning._types import ClientResult, ClientTask
from veil.network import ServerSettings, StateStore, create_app
from veil.network.device import DeviceClient, Identity
from veil.network.secagg import SecureFederatedServer
from veil.network.secagg_device import _SecureDevice
from veil.privacy import PrivacyLedger
from veil.runtime import SimulationRuntime
from veil.secagg import Step

CLIENTS = 6


def shards() -> tuple[Any, list[np.ndarray]]:
    data = make_tiny(n_train=120, n_test=10)
    return data, np.array_split(np.arange(120), CLIENTS)


def secure_fedavg(fraction: float = 1.0, **secagg: Any) -> SecureFedAvg:
    """Secure FedAvg of the tiny model over ``CLIENTS`` clients of 20 examples."""
    base = FedAvg(tiny_model_state(), CLIENTS, fraction, SGDTrainer(0.1, 1, 10), 0)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(FedAvg)}
    settings = SecAggConfig(**{"clip_range": 0.5, **secagg})
    return SecureFedAvg(**fields, secagg=settings, max_examples=20)


def secure_dp_fedavg(**secagg: Any) -> SecureDPFedAvg:
    """Distributed DP-FedAvg under secure aggregation, fixed-size sampling of 5."""
    base = DPFedAvg(
        global_state=tiny_model_state(),
        num_clients=CLIENTS,
        sample_rate=5 / CLIENTS,
        clipping_norm=0.5,
        noise_multiplier=1.0,
        trainer=SGDTrainer(0.1, 1, 10),
        ledger=PrivacyLedger("rdp", "replace_one"),
        sampling="fixed",
        placement="distributed",
        seed=3,
    )
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(DPFedAvg)}
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    return SecureDPFedAvg(**fields, secagg=SecAggConfig(**secagg))


def simulate(algorithm: Any, rounds: int) -> None:
    data, parts = shards()
    runtime = SimulationRuntime(lambda: tiny_net(), data.train, parts)
    for rnd in range(1, rounds + 1):
        runtime.run_round(algorithm, rnd)


class Recorder:
    """Wraps a secure algorithm to record what devices encode and what the server
    unmasks (the test's view from both sides of the wire)."""

    def __init__(self, algorithm: Any) -> None:
        self.inputs: dict[tuple[int, int], np.ndarray] = {}
        self.sums: dict[int, tuple[np.ndarray, tuple[int, ...]]] = {}
        encode, apply = algorithm.secure_input, algorithm.aggregate_sum

        def secure_input(task: ClientTask, result: ClientResult, invited: int) -> Any:
            out = encode(task, result, invited)
            self.inputs[(task.round, task.client_id)] = out.copy()
            return out

        def aggregate_sum(
            rnd: int, total: np.ndarray, included: Sequence[int], invited: int
        ) -> None:
            self.sums[rnd] = (total.copy(), tuple(included))
            apply(rnd, total, included, invited)

        algorithm.secure_input = secure_input
        algorithm.aggregate_sum = aggregate_sum


class SecureHarness:
    """A secure server, its app, and devices in threads that use the app."""

    def __init__(
        self,
        folder: Path,
        algorithm: Any,
        round_timeout: float = 20.0,
        step_timeout: float = 30.0,
        on_failed_round: str = "next",
    ) -> None:
        self.algorithm = algorithm
        self.recorder = Recorder(algorithm)
        self.store = StateStore(folder)
        settings = ServerSettings(
            round_timeout=round_timeout, on_failed_round=on_failed_round
        )
        self.server = SecureFederatedServer(
            algorithm, self.store, CLIENTS, settings, {"seed": 0}, 1e-3, step_timeout
        )
        self.http = TestClient(create_app(self.server))
        self.data, self.parts = shards()
        self.tokens: dict[int, str] = {}
        self.sent: list[tuple[str, int, bytes]] = []  # (path, client, body) posted
        self.error: BaseException | None = None

    def enrol_all(self) -> None:
        for k in range(CLIENTS):
            r = self.http.post("/v1/enrol", json={"client_id": k})
            assert r.status_code == 201, r.text
            self.tokens[k] = r.json()["token"]

    def device_client(self) -> DeviceClient:
        client = DeviceClient("http://testserver", max_unreachable=5)
        client.http.close()
        client.http = self.http
        harness = self

        original = client.request

        def request(method: str, path: str, **kw: Any) -> Any:
            if method == "POST" and "/secagg/" in path:
                token = kw["headers"]["Authorization"].split()[1]
                k = next(c for c, t in harness.tokens.items() if t == token)
                body = kw.get("content") or repr(kw.get("json")).encode()
                harness.sent.append((path, k, body))
            return original(method, path, **kw)

        client.request = request  # type: ignore[method-assign]
        return client

    def data_of(self, k: int) -> tuple[Any, Any]:
        idx = self.parts[k]
        return self.data.train.x[idx], self.data.train.y[idx]

    def run(self, rounds: int, stop_after: Mapping[int, Step] | None = None) -> None:
        """Run ``rounds`` rounds with one device thread acting for every client."""
        if not self.tokens:
            self.enrol_all()
        device = _SecureDevice(
            self.device_client(),
            self.algorithm,
            tiny_net(),
            self.data_of,
            [Identity(k, t) for k, t in self.tokens.items()],
            stop_after=stop_after or {},
        )

        def serve() -> None:
            try:
                self.server.run(rounds)
            except BaseException as exc:  # reported below
                self.error = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        end = time.monotonic() + 120
        while device.step() is not None:
            assert time.monotonic() < end, "the rounds did not finish"
            time.sleep(0.005)
        thread.join(timeout=30)
        assert not thread.is_alive()

    def get(self, path: str, k: int) -> Any:
        return self.http.get(path, headers=bearer(self.tokens[k]))

    def post(self, path: str, k: int | None, **kw: Any) -> Any:
        headers = {} if k is None else bearer(self.tokens[k])
        return self.http.post(path, headers={**headers, **kw.pop("headers", {})}, **kw)
