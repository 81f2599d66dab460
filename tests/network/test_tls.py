"""Real sockets in one process: uvicorn serving over TLS with a `veil certs`
certificate, device loops (httpx) trusting it, two full rounds; and a device that
does not trust the certificate refuses to talk."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from tests.network.conftest import NUM_CLIENTS, tiny_fedavg, tiny_net, tiny_shards
from tests.network.test_rounds import assert_same_model, simulate
from veil.errors import ServiceError
from veil.experiment._network import start_uvicorn
from veil.network import FederatedServer, ServerSettings, StateStore, create_app
from veil.network.certs import write_self_signed
from veil.network.device import Backoff, DeviceClient, run_device


def test_rounds_over_tls_equal_the_simulation(tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path / "certs")
    algorithm = tiny_fedavg()
    server = FederatedServer(
        algorithm, StateStore(tmp_path / "state"), NUM_CLIENTS, ServerSettings()
    )
    uv, thread, port = start_uvicorn(
        create_app(server), ssl_certfile=str(cert), ssl_keyfile=str(key)
    )
    url = f"https://127.0.0.1:{port}"
    try:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url + "/v1/status")  # the system's trust store: refused
        data, shards = tiny_shards()

        def device(clients: list[int]) -> None:
            client = DeviceClient(url, ca_file=cert)
            ids = [client.enrol(k) for k in clients]
            run_device(
                client,
                tiny_fedavg(),
                tiny_net(),
                lambda k: (data.train.x[shards[k]], data.train.y[shards[k]]),
                ids,
                Backoff(first=0.02, cap=0.1),
            )

        devices = [
            threading.Thread(target=device, args=(ids,)) for ids in ([0, 1], [2, 3])
        ]
        for d in devices:
            d.start()
        server.run(rounds=2)
        for d in devices:
            d.join(timeout=30)
            assert not d.is_alive()
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
    reference = tiny_fedavg()
    simulate(reference, rounds=2)
    assert_same_model(algorithm, reference)
    assert server.status()["updates_accepted"] == 4


def test_device_gives_up_on_an_unreachable_server() -> None:
    client = DeviceClient("http://127.0.0.1:9", max_unreachable=0.3)
    with pytest.raises(ServiceError, match=r"unreachable for 0\.3 s"):
        client.config()
