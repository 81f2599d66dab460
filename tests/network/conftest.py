"""Shared helpers: a server on a tiny FedAvg problem, driven through its HTTP app."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from tests.conftest import make_tiny
from veil.data import FederatedDataset
from veil.learning import FedAvg, SGDTrainer
from veil.learning._types import ClientResult, ClientTask, StateDict
from veil.learning.encoding import encode
from veil.network import FederatedServer, ServerSettings, StateStore, create_app
from veil.runtime import FederatedAlgorithm, RoundStats

NUM_CLIENTS = 4


def tiny_net() -> nn.Module:
    """A small model (7,850 parameters) keeps these tests fast."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def tiny_model_state() -> StateDict:
    """The same initial weights every time."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tiny_net().state_dict()


def tiny_fedavg(seed: int = 0, fraction: float = 0.5) -> FedAvg:
    model = tiny_net()
    model.load_state_dict(tiny_model_state())
    return FedAvg(
        model.state_dict(), NUM_CLIENTS, fraction, SGDTrainer(0.1, 1, 10), seed
    )


def tiny_shards() -> tuple[FederatedDataset, list[np.ndarray]]:
    data = make_tiny(n_train=80, n_test=10)
    return data, np.array_split(np.arange(80), NUM_CLIENTS)


class Harness:
    """A server with its app, a background thread running its rounds, and the
    device side of the same algorithm for making real updates."""

    def __init__(
        self,
        folder: Path,
        algorithm: FederatedAlgorithm,
        settings: ServerSettings | None = None,
        num_clients: int = NUM_CLIENTS,
    ) -> None:
        self.folder = folder
        self.algorithm = algorithm
        self.store = StateStore(folder)
        self.server = FederatedServer(
            algorithm, self.store, num_clients, settings, config={"seed": 0}
        )
        self.http = TestClient(create_app(self.server))
        self.data, self.shards = tiny_shards()
        self.thread: threading.Thread | None = None
        self.stats: list[RoundStats] = []
        self.error: BaseException | None = None

    def open_round(self, rnd: int) -> None:
        def run() -> None:
            try:
                self.stats.append(self.server.run_round(self.algorithm, rnd))
            except BaseException as exc:  # reported by wait()
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        for _ in range(500):
            status = self.server.status()["open_round"]
            if status is not None and status["round"] == rnd:
                return
            time.sleep(0.01)
        raise AssertionError(f"round {rnd} did not open: {self.error!r}")

    def wait(self) -> None:
        assert self.thread is not None
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()

    def enrol(self, client_id: int) -> str:
        r = self.http.post("/v1/enrol", json={"client_id": client_id})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def task(self, token: str) -> dict[str, Any] | None:
        r = self.http.get("/v1/task", headers=bearer(token))
        if r.status_code == 204:
            return None
        assert r.status_code == 200, r.text
        return dict(r.json())

    def fit(self, task: dict[str, Any], token: str) -> ClientResult:
        """Train as a device would: download the model, run client_fit."""
        r = self.http.get(f"/v1/rounds/{task['round']}/model", headers=bearer(token))
        assert r.status_code == 200, r.text
        from veil.learning.encoding import decode

        k = task["client_id"]
        t = ClientTask(
            k, task["round"], task["seed"], decode(r.content), task["settings"]
        )
        idx = self.shards[k]
        x, y = self.data.train.x[idx], self.data.train.y[idx]
        return self.algorithm.client_fit(t, tiny_net(), x, y)

    def upload(
        self,
        token: str,
        rnd: int,
        body: StateDict | bytes,
        meta: dict[str, Any] | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        payload = body if isinstance(body, bytes) else encode(body)
        if meta is None:
            meta = {"num_examples": 20, "loss": 1.0, "metrics": {}}
        h = {**bearer(token), **(headers or {})}
        if meta != "":
            h["X-Veil-Result"] = meta if isinstance(meta, str) else json.dumps(meta)
        return self.http.post(f"/v1/rounds/{rnd}/update", content=payload, headers=h)

    def upload_result(self, token: str, result: ClientResult) -> Any:
        meta = {
            "num_examples": result.num_examples,
            "loss": result.loss,
            "metrics": result.metrics,
        }
        return self.upload(token, result.round, result.update, meta)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "state", tiny_fedavg(), ServerSettings(round_timeout=30))
