"""Shared pieces of the DSSGD network tests: a tiny DSSGD problem, its simulation,
and a service driven in process through its HTTP app by the real device loop."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient

from tests.network.conftest import NUM_CLIENTS, tiny_model_state, tiny_net, tiny_shards
from veil.experiment._dssgd import DSSGDRun, TurnStats
from veil.learning import SGDTrainer
from veil.learning.dssgd import (
    DSSGDClient,
    DSSGDSettings,
    ParameterServer,
    SelectiveDP,
    flatten,
)
from veil.network import StateStore
from veil.network.device import DeviceClient, Identity
from veil.network.dssgd import DSSGDServerSettings, DSSGDService
from veil.network.dssgd_app import create_dssgd_app
from veil.network.dssgd_device import DeviceTraffic, run_dssgd_device
from veil.network.dssgd_store import TurnStore
from veil.privacy import PrivacyLedger
from veil.runtime import SimulationRuntime

SEED = 7


def trainer() -> SGDTrainer:
    return SGDTrainer(0.1, 2, 10, 2)  # two mini-batches per turn


def settings(
    dp: bool = False,
    upload: float = 0.05,
    download: float = 1.0,
    residual: bool = False,
) -> Any:
    if dp:
        return DSSGDSettings(
            upload,
            download,
            "threshold",
            1e-4,
            0.01,
            SelectiveDP(5.0, 0.01, 1e-4),
        )
    return DSSGDSettings(upload, download, residual=residual)


def new_ledger() -> PrivacyLedger:
    return PrivacyLedger("rdp", "add_or_remove_one")


def start() -> torch.Tensor:
    return flatten(tiny_model_state())


def simulate(
    order: str, rounds: int, s: DSSGDSettings
) -> tuple[DSSGDRun, list[TurnStats]]:
    """The simulation's run of the same problem."""
    data, shards = tiny_shards()
    runtime = SimulationRuntime(tiny_net, data.train, shards)
    ledger = new_ledger if s.dp is not None else (lambda: None)
    clients: list[Any] = [
        DSSGDClient(k, start().clone(), ledger()) for k in range(NUM_CLIENTS)
    ]
    run = DSSGDRun(
        ParameterServer(start(), NUM_CLIENTS),
        clients,
        runtime,
        trainer(),
        s,
        order,
        2,
        SEED,
    )
    stats = [t for rnd in range(1, rounds + 1) for t in run.run_round(rnd)]
    return run, stats


class NetHarness:
    """A DSSGD service with its app in process, and devices taking turns over it."""

    def __init__(
        self,
        folder: Path,
        order: str,
        rounds: int,
        s: DSSGDSettings,
        network: DSSGDServerSettings | None = None,
    ) -> None:
        self.folder = folder
        self.settings = s
        self.service = DSSGDService(
            start(),
            s,
            StateStore(folder),
            TurnStore(folder),
            NUM_CLIENTS,
            rounds,
            order,
            SEED,
            network,
            {"seed": SEED},
            new_ledger if s.dp is not None else None,
        )
        self.http = TestClient(create_dssgd_app(self.service))
        self.data, self.shards = tiny_shards()

    def close(self) -> None:
        self.service.store.close()
        self.service.turn_store.close()

    def enrol(self, client_id: int) -> str:
        r = self.http.post("/v1/enrol", json={"client_id": client_id})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def device(self) -> DeviceClient:
        """A device connection that talks to the in-process app."""
        client = DeviceClient.__new__(DeviceClient)
        client.http = self.http
        client.max_unreachable = 5.0
        return client

    def client_data(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.shards[k]
        return self.data.train.x[idx], self.data.train.y[idx]

    def run_devices(
        self, groups: list[list[int]], tokens: dict[int, str], rounds: int
    ) -> list[DeviceTraffic]:
        """Devices (one thread each, acting for ``groups``) take turns while the
        rounds are released one by one, as the runner does."""
        led = new_ledger if self.settings.dp is not None else (lambda: None)
        traffic: list[DeviceTraffic] = []
        errors: list[BaseException] = []

        def device(group: list[int]) -> None:
            try:
                states = {k: DSSGDClient(k, start().clone(), led()) for k in group}
                ids = [Identity(k, tokens[k]) for k in group]
                traffic.append(
                    run_dssgd_device(
                        self.device(),
                        states,
                        tiny_net(),
                        self.client_data,
                        trainer(),
                        self.settings,
                        ids,
                        asynchronous=self.service.order == "async",
                    )
                )
            except BaseException as exc:  # reported below
                errors.append(exc)

        self.service.release(0)
        threads = [threading.Thread(target=device, args=(g,)) for g in groups]
        for t in threads:
            t.start()
        for rnd in range(1, rounds + 1):
            self.service.release(rnd)
            self.service.wait_round(rnd)
        self.service.finish()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        return traffic


def take_turns_in_order(h: NetHarness, tokens: dict[int, str], rounds: int) -> int:
    """A synchronous order's turns taken one by one in this thread, through the
    HTTP app and the device's own turn code: ask for the current client's turn,
    then download, train and upload as a device does. Returns the turns applied."""
    from veil.network.dssgd_device import _Device

    led = new_ledger if h.settings.dp is not None else (lambda: None)
    states = {k: DSSGDClient(k, start().clone(), led()) for k in tokens}
    ids = {k: Identity(k, t) for k, t in tokens.items()}
    device = _Device(
        h.device(), states, tiny_net(), h.client_data, trainer(), h.settings, []
    )
    for rnd in range(1, rounds + 1):
        h.service.release(rnd)
        while (current := h.service.status()["current"]) is not None:
            if current["round"] > rnd:
                break
            k = current["client_id"]
            r = h.http.post("/v1/dssgd/turn", headers=_auth(tokens[k]))
            assert r.status_code == 200, r.text
            assert not device.take_turn(ids[k], r.json())
    h.service.finish()
    return device.traffic.turns


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def same_stats(a: list[TurnStats], b: list[TurnStats]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.client_id, x.bytes_up, x.bytes_down, x.uploaded, x.staleness) == (
            y.client_id,
            y.bytes_up,
            y.bytes_down,
            y.uploaded,
            y.staleness,
        )
        assert x.loss == y.loss or (math.isnan(x.loss) and math.isnan(y.loss))
