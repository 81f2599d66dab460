"""The network runtime in the runner, and the two ends ``veil serve`` and ``veil join``
build from one config.

- :func:`server_side`: the algorithm (FedAvg or DP-FedAvg, from the config, the same
  objects the simulation drives), the config as served to devices (with DP-FedAvg's
  calibrated noise multiplier filled in, so devices need not calibrate) and the
  server settings from ``[network]``.
- :func:`client_side`: what a device builds from the served config: the algorithm
  (for its ``client_fit``), a scratch model and its clients' data, read from the
  local dataset and split exactly as the runner splits it.
- :class:`NetworkRuntime`: ``runtime = "network"``. The first round starts a
  :class:`~veil.network.FederatedServer` on 127.0.0.1 (uvicorn in a thread, state
  in a temporary folder) and ``[network] devices`` device processes (``veil
  join``), which share the clients between them; every round then runs over HTTP.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from veil._seeding import Stream, numpy_rng
from veil.data import load_dataset, partition
from veil.errors import ConfigError
from veil.experiment._secagg import SecureFedAvg, secure_fedavg
from veil.experiment.config import ExperimentConfig, parse_config
from veil.experiment.rundir import append_record
from veil.learning import FedAvg, SGDTrainer
from veil.models import build_model
from veil.network import FederatedServer, ServerSettings, StateStore, create_app
from veil.network.secagg import SecureFederatedServer, is_secure
from veil.runtime import FederatedAlgorithm, RoundStats

__all__ = [
    "NetworkRuntime",
    "client_side",
    "join",
    "serve",
    "server_settings",
    "server_side",
    "start_uvicorn",
]

logger = logging.getLogger(__name__)

METHODS = ("fedavg", "dp-fedavg")
#: Seconds the device processes of ``runtime = "network"`` get to enrol.
STARTUP_SECONDS = 600


def server_settings(config: ExperimentConfig) -> ServerSettings:
    """``[network]`` as the server's settings."""
    n = config.network
    max_bytes = None if n.max_body_mb is None else int(n.max_body_mb * 2**20)
    return ServerSettings(
        round_timeout=n.round_timeout,
        min_results=n.min_results,
        on_failed_round=n.on_failed_round,
        max_update_norm=n.max_update_norm,
        max_body_bytes=max_bytes,
        max_examples=n.max_examples,
    )


def _served(config: ExperimentConfig, algorithm: FederatedAlgorithm) -> dict[str, Any]:
    raw = config.model_dump(mode="json", exclude_none=True)
    multiplier = getattr(algorithm, "noise_multiplier", None)
    if multiplier is not None:
        raw["dp_fedavg"]["noise_multiplier"] = multiplier
    if isinstance(algorithm, SecureFedAvg):  # the weights' public bound, resolved
        raw["secagg"]["max_examples"] = algorithm.max_examples
    return dict(raw)


def _build(
    config: ExperimentConfig,
    method: str,
    state: dict[str, torch.Tensor],
    shards: Callable[[], list[np.ndarray]] | None = None,
) -> tuple[FederatedAlgorithm, float | None]:
    """The algorithm of ``method``; ``shards`` gives the clients' example indices
    when secure FedAvg must find its weights' bound (``secagg.max_examples``)."""
    num_clients = config.data.num_clients
    if method == "dp-fedavg":
        from veil.experiment._dp_fedavg import build_dp_fedavg

        return build_dp_fedavg(config, state, num_clients)
    local = config.local
    algorithm = FedAvg(
        global_state=copy.deepcopy(state),
        num_clients=num_clients,
        client_fraction=config.fedavg.client_fraction,
        trainer=SGDTrainer(local.lr, local.epochs, local.batch_size),
        seed=config.seed,
    )
    if config.fedavg.secure_aggregation:
        bound = config.secagg.max_examples
        if bound is None and shards is None:
            raise ConfigError(
                "secure FedAvg over the network needs secagg.max_examples (the "
                "public bound on a client's example count), or the dataset to find it"
            )
        indices = shards() if bound is None and shards is not None else [range(1)]
        return secure_fedavg(algorithm, config, indices), None  # type: ignore[arg-type]
    return algorithm, None


def _check_method(config: ExperimentConfig, method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}")
    if method == "dp-fedavg" and config.dp_fedavg is None:
        raise ConfigError("method 'dp-fedavg' needs a [dp_fedavg] section")
    if method == "fedavg" and config.fedavg.local_dp:
        raise ConfigError(
            "fedavg.local_dp must be false for the network runtime (a client's "
            "DP-SGD ledger lives on the device and is not carried yet), got true"
        )


def _make_server(
    config: ExperimentConfig,
    algorithm: FederatedAlgorithm,
    store: StateStore,
    settings: ServerSettings,
    served: dict[str, Any],
    delta: float | None = None,
) -> FederatedServer:
    """A secure server for a secure algorithm, else a plain one."""
    n = config.data.num_clients
    if is_secure(algorithm):
        if config.secagg.dropout_rate > 0:
            logger.warning(
                "secagg.dropout_rate = %g: the network runtime simulates no "
                "dropouts (they are real: devices that miss a step's deadline); "
                "the rate only sizes SecAgg+'s k when neighbours = 'auto'",
                config.secagg.dropout_rate,
            )
        return SecureFederatedServer(
            algorithm, store, n, settings, served, delta, config.secagg.step_timeout
        )
    return FederatedServer(algorithm, store, n, settings, served, delta)


def _shards(
    config: ExperimentConfig, data_dir: str | Path | None
) -> tuple[Any, list[np.ndarray]]:
    """The local dataset and each client's example indices, split exactly as
    ``run_experiment`` splits them."""
    d = config.data
    dataset = load_dataset(d.dataset, data_dir or d.data_dir)
    shards = partition(
        d.partition,
        dataset.train.y.numpy(),
        d.num_clients,
        numpy_rng(config.seed, Stream.PARTITION),
        users=dataset.train.users,
        alpha=d.alpha,
        shards_per_client=d.shards_per_client,
    )
    return dataset, list(shards)


def server_side(
    config: ExperimentConfig, method: str, data_dir: str | Path | None = None
) -> tuple[FederatedAlgorithm, dict[str, Any], float | None]:
    """The server's algorithm for ``method``, the config devices are served and the
    delta at which epsilon is stated (DP-FedAvg). Secure FedAvg without
    ``secagg.max_examples`` reads the training labels to find the largest client."""
    from veil.experiment.runner import initial_state

    _check_method(config, method)
    algorithm, delta = _build(
        config, method, initial_state(config), lambda: _shards(config, data_dir)[1]
    )
    return algorithm, _served(config, algorithm), delta


ClientData = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def client_side(
    method: str, served: dict[str, Any], data_dir: str | Path | None = None
) -> tuple[FederatedAlgorithm, nn.Module, ClientData]:
    """What a device builds from the server's config: the algorithm, a scratch
    model, and each client's data (the local dataset split as the runner does)."""
    config = parse_config(served)
    _check_method(config, method)
    model = build_model(config.model.name)
    dataset, shards = _shards(config, data_dir)
    algorithm, _ = _build(config, method, model.state_dict(), lambda: shards)
    x, y = dataset.train.x, dataset.train.y

    def data(client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(shards[client_id])
        return x[idx], y[idx]

    return algorithm, model, data


def start_uvicorn(
    app: Any, host: str = "127.0.0.1", port: int = 0, **ssl: Any
) -> tuple[Any, threading.Thread, int]:
    """Serve ``app`` with uvicorn in a thread; return the server, the thread and
    the port (``port = 0`` picks a free one)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # Long polls (GET /v1/task?wait=S) answer now, or uvicorn would wait
            # for them before it stops.
            release = getattr(app.state, "release_waiters", None)
            if release is not None:
                release()
            await super().shutdown(sockets)

    server = Server(uvicorn.Config(app, log_level="warning", access_log=False, **ssl))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.daemon = True
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise ConfigError(f"the server could not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread, int(sock.getsockname()[1])


def _slices(num_clients: int, devices: int) -> list[str]:
    devices = max(min(devices, num_clients), 1)
    bounds = [round(i * num_clients / devices) for i in range(devices + 1)]
    return [f"{a}-{b - 1}" for a, b in itertools.pairwise(bounds) if b > a]


class NetworkRuntime:
    """``runtime = "network"``: a server on 127.0.0.1 and device processes.

    Args:
        config: the experiment (``[network]`` settings, the data devices read).
        num_clients: clients in the population.
        data_dir: folder of datasets the devices read (default: theirs).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        num_clients: int,
        data_dir: str | Path | None = None,
    ) -> None:
        if num_clients != config.data.num_clients:
            raise ConfigError(
                "the network runtime needs data.num_clients clients (devices split "
                f"the data themselves), got {num_clients} for {config.data.num_clients}"
            )
        self.config = config
        self.num_clients = num_clients
        self.data_dir = data_dir or os.environ.get("VEIL_DATA")
        self._folder = tempfile.TemporaryDirectory(prefix="veil-network-")
        self.server: FederatedServer | None = None
        self._uvicorn: Any = None
        self._thread: threading.Thread | None = None
        self.devices: list[subprocess.Popen[bytes]] = []
        self.url = ""

    def run_round(self, algorithm: FederatedAlgorithm, rnd: int) -> RoundStats:
        """Run round ``rnd`` over HTTP (starting the server and devices first)."""
        if self.server is None:
            self._start(algorithm)
        assert self.server is not None
        return self.server.run_round(algorithm, rnd)

    def _start(self, algorithm: FederatedAlgorithm) -> None:
        served = _served(self.config, algorithm)
        store = StateStore(self._folder.name)
        settings = server_settings(self.config)
        self.server = _make_server(self.config, algorithm, store, settings, served)
        self._uvicorn, self._thread, port = start_uvicorn(create_app(self.server))
        self.url = f"http://127.0.0.1:{port}"
        for clients in _slices(self.num_clients, self.config.network.devices):
            self.devices.append(self._spawn(clients))
        logger.info("network runtime: %s, %d devices", self.url, len(self.devices))
        self._wait_for_devices()

    def _wait_for_devices(self) -> None:
        """Wait until every client is enrolled, so that the first round's deadline
        is not spent starting processes (loading torch and the data takes seconds)."""
        assert self.server is not None
        end = time.monotonic() + STARTUP_SECONDS
        while self.server.status()["clients_enrolled"] < self.num_clients:
            failed = [p.returncode for p in self.devices if p.poll() not in (None, 0)]
            if failed or time.monotonic() > end:
                raise ConfigError(
                    f"device processes must enrol every client within "
                    f"{STARTUP_SECONDS} s; exit codes {failed}, enrolled "
                    f"{self.server.status()['clients_enrolled']} of {self.num_clients}"
                )
            time.sleep(0.1)

    def _spawn(self, clients: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "veil", "--threads", "1"]
        if logging.getLogger().isEnabledFor(logging.INFO):
            command.append("--verbose")
        command.append("join")
        command += ["--server", self.url, "--clients", clients]
        if self.data_dir is not None:
            command += ["--data-dir", str(self.data_dir)]
        return subprocess.Popen(command, stdin=subprocess.DEVNULL)

    def shutdown(self) -> None:
        """Tell devices the run is over, wait for them briefly, stop the server."""
        if self.server is not None:
            self.server.finish()
        deadline = time.monotonic() + 10
        for p in self.devices:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            assert self._thread is not None
            self._thread.join(timeout=10)
        if self.server is not None:
            self.server.store.close()
        self._folder.cleanup()


def _evaluator(
    config: ExperimentConfig,
    algorithm: FederatedAlgorithm,
    folder: Path,
    data_dir: str | Path | None,
) -> Callable[[RoundStats], None]:
    """Log each round to ``folder/metrics.jsonl``, with test accuracy when the
    server can read the dataset's test set (the server never needs training data)."""

    from veil.errors import DataError
    from veil.learning import evaluate

    try:
        test = load_dataset(config.data.dataset, data_dir or config.data.data_dir).test
    except DataError as exc:
        logger.warning("no test set, rounds are not evaluated: %s", exc)
        test = None
    model = build_model(config.model.name)

    def log(stats: RoundStats) -> None:
        record: dict[str, Any] = {
            "round": stats.round,
            "clients": stats.clients,
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "train_loss": stats.train_loss,
            "seconds": stats.seconds,
        }
        if test is not None:
            model.load_state_dict(getattr(algorithm, "global_state"))  # noqa: B009
            record["accuracy"], record["loss"] = evaluate(model, test.x, test.y)
        append_record(folder / "metrics.jsonl", record)
        logger.info("round %d: %s", stats.round, record)

    return log


def serve(
    config: ExperimentConfig,
    method: str,
    state_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8443,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    enrolment_key: str | None = None,
    linger: float = 10.0,
    data_dir: str | Path | None = None,
    announce: Callable[[str], None] = print,
) -> Path:
    """``veil serve``: run ``method``'s rounds for devices until the last one, then
    keep answering (devices learn the run is over) for ``linger`` seconds.
    Restarted on the same ``state_dir``, it resumes. Returns the final model's path.
    """
    from dataclasses import replace

    from safetensors.torch import save_file

    if (certfile is None) != (keyfile is None):
        raise ConfigError("give both --cert and --key for TLS, or neither")
    if method == "dssgd":
        from veil.experiment._network_dssgd import serve_dssgd

        tls = {} if certfile is None else {"ssl_certfile": str(certfile)}
        if keyfile is not None:
            tls["ssl_keyfile"] = str(keyfile)
        return serve_dssgd(
            config,
            state_dir,
            host=host,
            port=port,
            ssl=tls,
            enrolment_key=enrolment_key,
            linger=linger,
            data_dir=data_dir,
            announce=announce,
        )
    algorithm, served, delta = server_side(config, method, data_dir)
    folder = Path(state_dir)
    store = StateStore(folder)
    settings = replace(server_settings(config), enrolment_key=enrolment_key)
    server = _make_server(config, algorithm, store, settings, served, delta)
    ssl = {} if certfile is None else {"ssl_certfile": str(certfile)}
    if keyfile is not None:
        ssl["ssl_keyfile"] = str(keyfile)
    uv, thread, port = start_uvicorn(create_app(server), host, port, **ssl)
    scheme = "http" if certfile is None else "https"
    announce(f"serving {method} on {scheme}://{host}:{port} (state in {folder})")
    rounds = config.fedavg.rounds
    if method == "dp-fedavg" and config.dp_fedavg is not None:
        rounds = config.dp_fedavg.rounds
    try:
        server.run(rounds, _evaluator(config, algorithm, folder, data_dir))
        final = folder / "final.safetensors"
        state = getattr(algorithm, "global_state")  # noqa: B009
        save_file({k: v.contiguous() for k, v in state.items()}, final)
        announce(f"done: {final}")
        time.sleep(linger)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        store.close()
    return final


def _read_tokens(path: Path | None) -> dict[str, str]:
    """The tokens kept in ``path`` (client id -> token), checked before anything is
    enrolled, so that a token file that cannot be written or read never costs a
    client its identity."""
    import json

    if path is None:
        return {}
    if not path.parent.is_dir():
        raise ConfigError(
            f"--token-file {path}: its folder {path.parent} does not exist; create it "
            "or choose another file"
        )
    if not path.exists():
        return {}
    try:
        known = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            f"--token-file {path} is not a token file written by veil join "
            f"(JSON {{client id: token}}): {exc}"
        ) from None
    if not isinstance(known, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in known.items()
    ):
        raise ConfigError(
            f"--token-file {path} must hold a JSON object {{client id: token}}"
        )
    return known


def join(
    server: str,
    clients: list[int],
    *,
    ca_file: str | Path | None = None,
    data_dir: str | Path | None = None,
    token_file: str | Path | None = None,
    enrolment_key: str | None = None,
    max_unreachable: float = 120.0,
    task_wait: float = 10.0,
) -> int:
    """``veil join``: act as devices for ``clients`` until the run is over; return
    the number of updates accepted. Tokens are kept in ``token_file`` (JSON, owner
    only) when given, so a restarted device keeps its identities. ``task_wait``:
    seconds the server may hold an idle task request (0 to 10; 0 polls with
    backoff)."""
    import json

    from veil.network.device import DeviceClient, Identity, run_device

    path = None if token_file is None else Path(token_file)
    known = _read_tokens(path)
    client = DeviceClient(server, ca_file, max_unreachable)
    try:
        method, served = client.config()
        if method != "dssgd":
            algorithm, model, data = client_side(method, served, data_dir)
        identities = []
        for k in clients:
            if str(k) not in known:
                known[str(k)] = client.enrol(k, enrolment_key).token
                if path is not None:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with os.fdopen(fd, "w") as f:
                        json.dump(known, f)
            identities.append(Identity(k, known[str(k)]))
        if method == "dssgd":
            from veil.experiment._network_dssgd import join_dssgd

            return join_dssgd(client, served, identities, data_dir).turns
        if is_secure(algorithm):
            from veil.network.secagg_device import run_secure_device

            return run_secure_device(
                client, algorithm, model, data, identities, wait=task_wait
            )
        return run_device(client, algorithm, model, data, identities, wait=task_wait)
    finally:
        client.close()
