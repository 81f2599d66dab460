"""DSSGD on the network runtime: the runner's ``runtime = "network"``, ``veil serve``
and ``veil join`` for the ``dssgd`` method.

- :func:`build_service`: the :class:`~veil.network.dssgd.DSSGDService` of one run
  (one θu) from the config, with the config served to devices (its
  ``dssgd.upload_fraction`` set to that run's θu).
- :func:`device_side`: what ``veil join`` builds from the served config: the turn
  settings and trainer, a scratch model, a :class:`~veil.learning.dssgd.DSSGDClient`
  per client (starting from the run's initial weights, as in the simulation) and the
  clients' data, split exactly as the runner splits it.
- :func:`network_run`: for the runner, a service on 127.0.0.1 (uvicorn in a thread,
  state in a temporary folder) and ``[network] devices`` ``veil join`` processes; its
  :class:`NetworkDSSGDRun` answers the runner as the simulation's run does
  (``run_round``, ``server``, ``client_states``), so metrics, models, ledgers and the
  report are written the same way.
- :func:`serve_dssgd`: ``veil serve`` for a config whose method is ``dssgd``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from veil._seeding import Stream, numpy_rng
from veil.data import load_dataset, partition
from veil.errors import ConfigError
from veil.experiment._dssgd import (
    TurnStats,
    client_ledger,
    settings_from_config,
    turn_trainer,
)
from veil.experiment.config import ExperimentConfig, parse_config
from veil.experiment.rundir import append_record
from veil.learning import SGDTrainer
from veil.learning.dssgd import DSSGDClient, DSSGDSettings, ParameterServer, flatten
from veil.models import build_model
from veil.network import StateStore
from veil.network.dssgd import DSSGDServerSettings, DSSGDService
from veil.network.dssgd_app import create_dssgd_app
from veil.network.dssgd_store import TurnRow, TurnStore

if TYPE_CHECKING:
    from veil.experiment.runner import RunContext
    from veil.network.dssgd_device import DeviceTraffic

__all__ = [
    "NetworkDSSGDRun",
    "build_service",
    "device_side",
    "join_dssgd",
    "network_run",
    "serve_dssgd",
    "served_config",
]

logger = logging.getLogger(__name__)

#: Seconds the device processes of ``runtime = "network"`` get to enrol.
STARTUP_SECONDS = 600


def served_config(config: ExperimentConfig, upload_fraction: float) -> dict[str, Any]:
    """The config devices are served: ``config`` with this run's θu alone."""
    raw = config.model_dump(mode="json", exclude_none=True)
    raw["dssgd"]["upload_fraction"] = upload_fraction
    return dict(raw)


def build_service(
    config: ExperimentConfig,
    upload_fraction: float,
    folder: str | Path,
    enrolment_key: str | None = None,
) -> DSSGDService:
    """The DSSGD service of one run (θu = ``upload_fraction``), state in
    ``folder`` (restored from when it holds this run)."""
    from veil.experiment.runner import initial_state

    d = config.dssgd
    start = flatten(initial_state(config))
    trainable = sum(p.numel() for p in build_model(config.model.name).parameters())
    if trainable != start.numel():
        raise ConfigError(
            f"dssgd needs a model whose state is its parameters; "
            f"{config.model.name!r} has buffers: choose another model"
        )
    network = DSSGDServerSettings(
        turn_timeout=config.network.round_timeout,
        max_body_bytes=(
            None
            if config.network.max_body_mb is None
            else int(config.network.max_body_mb * 2**20)
        ),
        enrolment_key=enrolment_key,
    )
    new_ledger = None
    if d.dp is not None:

        def new_ledger() -> Any:
            return client_ledger(d)

    return DSSGDService(
        start,
        settings_from_config(d, upload_fraction),
        StateStore(folder),
        TurnStore(folder),
        config.data.num_clients,
        d.rounds,
        d.order,
        config.seed,
        network,
        served_config(config, upload_fraction),
        new_ledger,
    )


def _close(service: DSSGDService) -> None:
    service.store.close()
    service.turn_store.close()


ClientData = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DeviceSide:
    """What a device builds from the served config."""

    settings: DSSGDSettings
    trainer: SGDTrainer
    model: nn.Module
    data: ClientData
    new_client: Callable[[int], DSSGDClient]
    order: str


def device_side(served: dict[str, Any], data_dir: str | Path | None) -> DeviceSide:
    """The client side of the served run: settings, trainer, model, data, clients."""
    from veil.experiment.runner import initial_state

    config = parse_config(served)
    d = config.dssgd
    fractions = d.upload_fractions
    if len(fractions) != 1:
        raise ConfigError(
            f"the served dssgd.upload_fraction must be one value, got {fractions}"
        )
    start = flatten(initial_state(config))
    data = _client_data(config, data_dir)

    def new_client(k: int) -> DSSGDClient:
        return DSSGDClient(k, start.clone(), client_ledger(d))

    return DeviceSide(
        settings_from_config(d, fractions[0]),
        turn_trainer(config),
        build_model(config.model.name),
        data,
        new_client,
        d.order,
    )


def _client_data(config: ExperimentConfig, data_dir: str | Path | None) -> ClientData:
    d = config.data
    dataset = load_dataset(d.dataset, data_dir or d.data_dir)
    shards = partition(  # exactly as run_experiment splits it
        d.partition,
        dataset.train.y.numpy(),
        d.num_clients,
        numpy_rng(config.seed, Stream.PARTITION),
        users=dataset.train.users,
        alpha=d.alpha,
        shards_per_client=d.shards_per_client,
    )
    x, y = dataset.train.x, dataset.train.y

    def data(client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(shards[client_id])
        return x[idx], y[idx]

    return data


def turn_stats(row: TurnRow) -> TurnStats:
    """An applied turn as the runner's :class:`TurnStats`."""
    return TurnStats(
        row.client_id,
        row.bytes_up or 0,
        row.bytes_down,
        row.uploaded or 0,
        row.staleness or 0,
        float("nan") if row.loss is None else row.loss,
        bool(row.over_budget),
    )


class NetworkDSSGDRun:
    """One DSSGD run over HTTP, answering the runner as :class:`DSSGDRun` does.

    Args:
        service: the parameter server, already serving.
        settings: the run's turn settings.
    """

    def __init__(
        self,
        service: DSSGDService,
        settings: DSSGDSettings,
        devices: list[subprocess.Popen[bytes]] | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.clients = list(range(service.num_clients))
        self.devices = devices or []
        self._seen = 0

    @property
    def server(self) -> ParameterServer:
        """The parameter server behind the endpoints."""
        return self.service.server

    def run_round(self, rnd: int) -> list[TurnStats]:
        """Let devices take round ``rnd``'s turns; return those applied."""
        self.service.release(rnd)
        rows = self.service.wait_round(rnd, check=self._check_devices)
        new, self._seen = rows[self._seen :], len(rows)
        return [turn_stats(r) for r in new]

    def _check_devices(self) -> None:
        codes = [p.poll() for p in self.devices]
        if self.devices and all(c is not None for c in codes):
            raise ConfigError(
                f"every device process has exited (exit codes {codes}) before the "
                "run's turns were done; see their output above"
            )

    def client_states(self) -> list[DSSGDClient]:
        """Each client's privacy record, as the server accounted it."""
        return self.service.client_records()


def _slices(num_clients: int, devices: int) -> list[str]:
    from veil.experiment._network import _slices as slices

    return slices(num_clients, devices)


def _spawn(url: str, clients: str, data_dir: str | None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "veil", "--threads", "1"]
    if logging.getLogger().isEnabledFor(logging.INFO):
        command.append("--verbose")
    command += ["join", "--server", url, "--clients", clients]
    if data_dir is not None:
        command += ["--data-dir", data_dir]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


def _wait_for_devices(
    service: DSSGDService, devices: list[subprocess.Popen[bytes]]
) -> None:
    end = time.monotonic() + STARTUP_SECONDS
    while service.status()["clients_enrolled"] < service.num_clients:
        failed = [p.returncode for p in devices if p.poll() not in (None, 0)]
        if failed or time.monotonic() > end:
            raise ConfigError(
                f"device processes must enrol every client within {STARTUP_SECONDS} "
                f"s; exit codes {failed}, enrolled "
                f"{service.status()['clients_enrolled']} of {service.num_clients}"
            )
        time.sleep(0.1)


@contextmanager
def network_run(ctx: RunContext, upload_fraction: float) -> Iterator[NetworkDSSGDRun]:
    """A DSSGD run over HTTP on 127.0.0.1 with ``[network] devices`` device
    processes; everything is stopped on exit."""
    from veil.experiment._network import start_uvicorn

    cfg = ctx.config
    if len(ctx.client_indices) != cfg.data.num_clients:
        raise ConfigError(
            "the network runtime needs data.num_clients clients (devices split the "
            f"data themselves), got {len(ctx.client_indices)}"
        )
    folder = tempfile.TemporaryDirectory(prefix="veil-dssgd-")
    service = build_service(cfg, upload_fraction, folder.name)
    service.release(0)  # no turn before the runner asks for round 1
    uv, thread, port = start_uvicorn(create_dssgd_app(service))
    url = f"http://127.0.0.1:{port}"
    data_dir = os.environ.get("VEIL_DATA")
    devices = [
        _spawn(url, clients, data_dir)
        for clients in _slices(cfg.data.num_clients, cfg.network.devices)
    ]
    logger.info("dssgd over the network: %s, %d devices", url, len(devices))
    try:
        _wait_for_devices(service, devices)
        yield NetworkDSSGDRun(service, service.settings, devices)
    finally:
        service.finish()
        deadline = time.monotonic() + 10
        for p in devices:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        uv.should_exit = True
        thread.join(timeout=10)
        _close(service)
        folder.cleanup()


def serve_dssgd(
    config: ExperimentConfig,
    state_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8443,
    ssl: dict[str, str] | None = None,
    enrolment_key: str | None = None,
    linger: float = 10.0,
    data_dir: str | Path | None = None,
    announce: Callable[[str], None] = print,
) -> Path:
    """``veil serve`` for ``dssgd``: serve turns until the last round, logging each
    round to ``STATE/metrics.jsonl`` (with test accuracy when the test set is
    readable), then answer 410 for ``linger`` seconds. Restarted on the same
    folder, it resumes. Runs the config's first θu. Returns the final model's path.
    """
    from safetensors.torch import save_file

    from veil.experiment._network import start_uvicorn
    from veil.experiment.runner import initial_state
    from veil.learning.dssgd import unflatten

    fraction = config.dssgd.upload_fractions[0]
    folder = Path(state_dir)
    service = build_service(config, fraction, folder, enrolment_key)
    like = initial_state(config)
    log = _round_logger(config, folder, data_dir, like)
    service.release(service.next_round - 1)  # no turn past the rounds released
    uv, thread, port = start_uvicorn(
        create_dssgd_app(service), host, port, **(ssl or {})
    )
    scheme = "http" if not ssl else "https"
    announce(f"serving dssgd on {scheme}://{host}:{port} (state in {folder})")
    try:
        seen = service.applied_before(service.next_round)
        for rnd in range(service.next_round, config.dssgd.rounds + 1):
            start = time.perf_counter()
            service.release(rnd)
            rows = service.wait_round(rnd)
            seconds = time.perf_counter() - start
            log(rnd, rows[seen:], seconds, service.server.parameters())
            seen = len(rows)
        service.finish()
        final = folder / "final.safetensors"
        state = unflatten(service.server.parameters(), like)
        save_file({k: v.contiguous() for k, v in state.items()}, final)
        announce(f"done: {final}")
        time.sleep(linger)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        _close(service)
    return final


def _round_logger(
    config: ExperimentConfig,
    folder: Path,
    data_dir: str | Path | None,
    like: dict[str, torch.Tensor],
) -> Callable[[int, list[TurnRow], float, torch.Tensor], None]:
    """Log a round to ``folder/metrics.jsonl``, with test accuracy when the server
    can read the test set (it never needs the training data)."""
    from veil.errors import DataError
    from veil.learning import evaluate
    from veil.learning.dssgd import unflatten

    try:
        test = load_dataset(config.data.dataset, data_dir or config.data.data_dir).test
    except DataError as exc:
        logger.warning("no test set, rounds are not evaluated: %s", exc)
        test = None
    model = build_model(config.model.name)

    def log(
        rnd: int, rows: list[TurnRow], seconds: float, params: torch.Tensor
    ) -> None:
        record: dict[str, Any] = {
            "round": rnd,
            "turns": len(rows),
            "bytes_up": sum(r.bytes_up or 0 for r in rows),
            "bytes_down": sum(r.bytes_down for r in rows),
            "staleness_max": max((r.staleness or 0 for r in rows), default=0),
            "seconds": seconds,
        }
        if test is not None:
            model.load_state_dict(unflatten(params, like))
            record["accuracy"], record["loss"] = evaluate(model, test.x, test.y)
        append_record(folder / "metrics.jsonl", record)
        logger.info("round %d: %s", rnd, record)

    return log


def join_dssgd(
    client: Any,
    served: dict[str, Any],
    identities: list[Any],
    data_dir: str | Path | None = None,
) -> DeviceTraffic:
    """``veil join`` for a ``dssgd`` server: take turns for ``identities`` until
    the run is over; return the device's traffic."""
    from veil.network.dssgd_device import run_dssgd_device

    side = device_side(served, data_dir)
    states = {i.client_id: side.new_client(i.client_id) for i in identities}
    return run_dssgd_device(
        client,
        states,
        side.model,
        side.data,
        side.trainer,
        side.settings,
        identities,
        asynchronous=side.order == "async",
    )
