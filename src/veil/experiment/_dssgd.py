"""The runner's ``dssgd`` method: distributed selective SGD on the configured runtime.

This is the driver of :mod:`veil.learning.dssgd`: it builds the parameter server
and one :class:`~veil.learning.dssgd.DSSGDClient` per client, runs the turns of
every round in the configured participant order, and logs one ``metrics.jsonl``
record per evaluation. The server side of a turn runs here; the client side
(:func:`client_turn`: decode the download, train, encode the upload) runs where the
runtime puts it: in this process (``runtime = "simulation"``) or as a Ray task
(``runtime = "ray"``), with the same result for the same seed; on
``runtime = "network"`` the server side runs behind HTTP endpoints and the client
side in device processes (:mod:`veil.experiment._network_dssgd`). Every message really
is encoded and decoded (:func:`~veil.learning.dssgd.encode_sparse`), so
``bytes_up`` and ``bytes_down`` are the exact sizes of what a network runtime would
send.

Orders: ``round_robin`` and ``random`` run the turns one after another;
``async`` runs a round's turns concurrently on ``dssgd.workers`` threads (each with
its own scratch model), the server applying each upload atomically and recording its
staleness. Rounds only mark when the model is evaluated. The asynchronous order is
not reproducible and runs on the simulation and network runtimes only
(:func:`check_runtime`).

With ``dssgd.upload_fraction`` a list, the method runs once per value, logged as
``dssgd-u<θu>``; each run's model is saved under that name. Under ``[dssgd.dp]``
each client keeps a privacy ledger, written to ``RUN_DIR/privacy/<name>.json``.
:func:`dssgd_section` is the report's DSSGD section, built from the metrics alone.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from veil.errors import ConfigError
from veil.experiment._dp import write_ledger
from veil.experiment._runtime import open_runtime
from veil.experiment.config import DSSGDConfig, ExperimentConfig
from veil.experiment.rundir import save_model
from veil.learning import SGDTrainer, StateDict, encoded_size, evaluate
from veil.learning.dssgd import (
    Download,
    DSSGDClient,
    DSSGDSettings,
    ParameterServer,
    SelectiveDP,
    Upload,
    decode_sparse,
    encode_sparse,
    flatten,
    turn_order,
    turn_seed,
    unflatten,
    upload_count,
)
from veil.models import build_model
from veil.privacy import PrivacyBudget, PrivacyLedger
from veil.runtime import RayRuntime, SimulationRuntime, TurnRuntime

if TYPE_CHECKING:
    from veil.experiment._network_dssgd import NetworkDSSGDRun
    from veil.experiment.runner import RunContext

__all__ = [
    "DSSGDRun",
    "TurnReply",
    "TurnStats",
    "check_runtime",
    "client_ledger",
    "client_turn",
    "dssgd_method_names",
    "dssgd_section",
    "run_dssgd",
    "run_turn",
    "settings_from_config",
    "turn_trainer",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TurnStats:
    """What one turn cost and did."""

    client_id: int
    bytes_up: int
    bytes_down: int
    uploaded: int
    staleness: int
    loss: float
    over_budget: bool


def settings_from_config(cfg: DSSGDConfig, upload_fraction: float) -> DSSGDSettings:
    """The turn settings of one run of ``[dssgd]``."""
    dp = None
    if cfg.dp is not None:
        assert cfg.bound is not None  # the config requires it with dp
        dp = SelectiveDP(
            cfg.dp.epsilon_per_parameter,
            cfg.bound,
            cfg.threshold,
            cfg.dp.selection_share,
            cfg.dp.secure_noise,
        )
    return DSSGDSettings(
        upload_fraction,
        cfg.download_fraction,
        cfg.selection,
        cfg.threshold,
        cfg.bound,
        dp,
        cfg.residual,
    )


def dssgd_method_names(cfg: DSSGDConfig) -> list[tuple[str, float]]:
    """``(method name, θu)`` of each run: ``dssgd`` alone, or ``dssgd-u<θu>``."""
    fractions = cfg.upload_fractions
    if len(fractions) == 1:
        return [("dssgd", fractions[0])]
    return [(f"dssgd-u{u:g}", u) for u in fractions]


@dataclass(frozen=True)
class TurnReply:
    """What a client sends back at the end of its turn.

    Attributes:
        payload: the encoded upload (:func:`~veil.learning.dssgd.encode_sparse`).
        loss: mean training loss of the turn (metrics only).
        over_budget: the client's privacy budget stopped its upload.
    """

    payload: bytes
    loss: float
    over_budget: bool


def client_turn(
    client: DSSGDClient,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    payload: bytes,
    version: int,
    generator_state: torch.Tensor,
    trainer: SGDTrainer,
    settings: DSSGDSettings,
) -> tuple[DSSGDClient, TurnReply]:
    """The client's half of a turn, wherever the runtime runs it: decode the
    download, train, choose and encode the upload.

    ``generator_state`` is the turn's generator as the server's download left it, so
    the client draws exactly what it would have drawn in one process. Returns the
    client (changed) and its reply.
    """
    generator = torch.Generator()
    generator.set_state(generator_state)
    download = Download(client.client_id, decode_sparse(payload), version)
    upload = client.turn(download, model, x, y, trainer, generator, settings)
    over_budget = bool(upload.metrics.get("over_budget"))
    return client, TurnReply(encode_sparse(upload.vector), upload.loss, over_budget)


def run_turn(
    server: ParameterServer,
    runtime: TurnRuntime,
    clients: list[Any],
    client_id: int,
    trainer: SGDTrainer,
    settings: DSSGDSettings,
    seed: int,
) -> TurnStats:
    """One client's turn: the server's download, the client's step on ``runtime``
    (``clients[client_id]`` is replaced by the handle on its new state), the
    server's upload; both messages encoded and decoded on the way."""
    generator = torch.Generator().manual_seed(seed)
    k = client_id

    # Download: the server picks and encodes; the client decodes, trains, encodes.
    sent = server.download(k, settings.download_fraction, generator)
    payload_down = encode_sparse(sent.vector)
    clients[k], reply = runtime.run_client(
        client_turn,
        k,
        clients[k],
        payload_down,
        sent.version,
        generator.get_state(),
        trainer,
        settings,
    )

    # Upload: the server decodes and applies atomically.
    received = Upload(k, decode_sparse(reply.payload), sent.version)
    staleness = server.apply(received)
    return TurnStats(
        k,
        len(reply.payload),
        len(payload_down),
        received.vector.count,
        staleness,
        reply.loss,
        reply.over_budget,
    )


@dataclass
class DSSGDRun:
    """One DSSGD run: server, clients, and the runtime their turns run on.

    ``clients`` holds, for each client, its :class:`DSSGDClient` or the runtime's
    handle on it (:meth:`client_states` resolves them).
    """

    server: ParameterServer
    clients: list[Any]
    runtime: TurnRuntime
    trainer: SGDTrainer
    settings: DSSGDSettings
    order: str
    workers: int
    seed: int

    def _turn(self, rnd: int, k: int) -> TurnStats:
        return run_turn(
            self.server,
            self.runtime,
            self.clients,
            k,
            self.trainer,
            self.settings,
            turn_seed(self.seed, rnd, k),
        )

    def run_round(self, rnd: int) -> list[TurnStats]:
        """Every client's turn of round ``rnd``, in the run's order."""
        order = turn_order(self.order, len(self.clients), rnd, self.seed)
        if self.order != "async":
            return [self._turn(rnd, k) for k in order]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="dssgd") as pool:
            return list(pool.map(lambda k: self._turn(rnd, k), order))

    def client_states(self) -> list[DSSGDClient]:
        """Every client's current state (fetched from where the runtime keeps it)."""
        return self.runtime.fetch(self.clients)


def check_runtime(order: str, runtime: object) -> None:
    """Refuse the asynchronous order anywhere but the simulation runtime."""
    if order == "async" and not isinstance(runtime, SimulationRuntime):
        raise ConfigError(
            "dssgd.order must be 'round_robin' or 'random' on the "
            f"{type(runtime).__name__}, got 'async': its turns interleave "
            "differently in every run, so only runtime = 'simulation' runs it"
        )


def _new_run(
    ctx: RunContext, upload_fraction: float, runtime: TurnRuntime | None = None
) -> DSSGDRun:
    cfg = ctx.config
    d = cfg.dssgd
    settings = settings_from_config(d, upload_fraction)
    start = flatten(ctx.initial_state)
    trainable = sum(p.numel() for p in build_model(cfg.model.name).parameters())
    if trainable != start.numel():
        raise ConfigError(
            f"dssgd needs a model whose state is its parameters; {cfg.model.name!r} "
            f"has {start.numel() - trainable} values in buffers (BatchNorm "
            "statistics?): choose another model"
        )
    if runtime is None:
        model_fn = functools.partial(build_model, cfg.model.name)
        runtime = SimulationRuntime(model_fn, ctx.dataset.train, ctx.client_indices)
    check_runtime(d.order, runtime)
    server = ParameterServer(start, len(ctx.client_indices))
    clients: list[Any] = [
        DSSGDClient(k, start.clone(), _client_ledger(d))
        for k in range(len(ctx.client_indices))
    ]
    trainer = turn_trainer(cfg)
    return DSSGDRun(
        server, clients, runtime, trainer, settings, d.order, d.workers, cfg.seed
    )


def turn_trainer(cfg: ExperimentConfig) -> SGDTrainer:
    """A turn's local training: ``local.epochs`` epochs, or ``dssgd.local_batches``
    mini-batches when set."""
    local, d = cfg.local, cfg.dssgd
    epochs = local.epochs if d.local_batches is None else d.local_batches
    return SGDTrainer(local.lr, epochs, local.batch_size, d.local_batches)


def client_ledger(d: DSSGDConfig) -> PrivacyLedger | None:
    """A client's privacy ledger under ``[dssgd.dp]`` (with its budget), else
    ``None``."""
    return _client_ledger(d)


def _client_ledger(d: DSSGDConfig) -> PrivacyLedger | None:
    if d.dp is None:
        return None
    budget = None
    if d.dp.budget_epsilon is not None:
        budget = PrivacyBudget(d.dp.budget_epsilon, d.dp.delta)
    return PrivacyLedger(d.dp.accountant, "add_or_remove_one", budget)


def _privacy_metrics(run: Any, d: DSSGDConfig) -> dict[str, Any]:
    if d.dp is None:
        return {}
    assert run.settings.dp is not None
    capacity = upload_count(run.settings.upload_fraction, run.server.size)
    clients = run.client_states()
    ledgers = [c.ledger for c in clients if c.ledger is not None]
    eps = [ledger.epsilon(d.dp.delta) for ledger in ledgers if ledger.events]
    return {
        "epsilon": max(eps, default=0.0),
        "epsilon_pure": max(c.pure_epsilon for c in clients),
        "epsilon_upload": capacity * d.dp.epsilon_per_parameter,
        "epsilon_per_parameter": d.dp.epsilon_per_parameter,
        "delta": d.dp.delta,
        "uploads_max": max(c.uploads for c in clients),
    }


def _run_one(
    ctx: RunContext,
    run: DSSGDRun | NetworkDSSGDRun,
    name: str,
    upload_fraction: float,
    done: int,
) -> StateDict:
    cfg = ctx.config
    d = cfg.dssgd
    model = ctx.new_model()
    test = ctx.dataset.test
    dense_bytes = encoded_size(ctx.initial_state)
    pending: list[TurnStats] = []
    seconds = 0.0
    for rnd in range(1, d.rounds + 1):
        start = time.perf_counter()
        pending += run.run_round(rnd)
        seconds += time.perf_counter() - start
        if rnd % d.eval_every and rnd != d.rounds:
            continue
        model.load_state_dict(unflatten(run.server.parameters(), ctx.initial_state))
        accuracy, loss = evaluate(model, test.x, test.y)
        ctx.metrics.log(
            method=name,
            axis="round",
            round=rnd,
            accuracy=accuracy,
            loss=loss,
            train_loss=float(np.mean([t.loss for t in pending])),
            clients=len(run.clients),
            bytes_up=sum(t.bytes_up for t in pending),
            bytes_down=sum(t.bytes_down for t in pending),
            seconds=seconds,
            turns=len(pending),
            uploads=run.server.version,
            upload_fraction=upload_fraction,
            download_fraction=d.download_fraction,
            order=d.order,
            residual=d.residual,
            parameters=run.server.size,
            uploaded_per_turn=float(np.mean([t.uploaded for t in pending])),
            upload_bytes_per_turn=float(np.mean([t.bytes_up for t in pending])),
            download_bytes_per_turn=float(np.mean([t.bytes_down for t in pending])),
            dense_upload_bytes=dense_bytes,
            staleness_mean=float(np.mean([t.staleness for t in pending])),
            staleness_max=max(t.staleness for t in pending),
            over_budget=sum(t.over_budget for t in pending),
            **_privacy_metrics(run, d),
        )
        logger.info("%s round %d: accuracy %.4f", name, rnd, accuracy)
        ctx.advance("dssgd", done + rnd, accuracy)
        pending, seconds = [], 0.0
    if d.dp is not None and ctx.run_dir is not None:
        clients = run.client_states()
        ledgers = {c.client_id: c.ledger for c in clients if c.ledger is not None}
        write_ledger(ctx.run_dir, name, ledgers, d.dp.delta)
    return unflatten(run.server.parameters(), ctx.initial_state)


def run_dssgd(ctx: RunContext) -> StateDict:
    """Run DSSGD once per θu; return the last run's global model.

    Each run's model is saved as ``models/<name>.safetensors`` when there are
    several; the runner saves the returned one as ``models/dssgd.safetensors``.
    """
    cfg = ctx.config
    names = dssgd_method_names(cfg.dssgd)
    state: StateDict = {}
    if cfg.runtime == "network":
        from veil.experiment._network_dssgd import network_run

        for i, (name, fraction) in enumerate(names):
            with network_run(ctx, fraction) as net:
                state = _run_one(ctx, net, name, fraction, i * cfg.dssgd.rounds)
            if len(names) > 1 and ctx.run_dir is not None:
                save_model(ctx.run_dir, name, state)
        return state
    with open_runtime(cfg, ctx.dataset.train, ctx.client_indices) as runtime:
        if not isinstance(runtime, SimulationRuntime | RayRuntime):
            raise ConfigError("dssgd needs runtime = 'simulation', 'ray' or 'network'")
        check_runtime(cfg.dssgd.order, runtime)
        for i, (name, fraction) in enumerate(names):
            run = _new_run(ctx, fraction, runtime)
            state = _run_one(ctx, run, name, fraction, i * cfg.dssgd.rounds)
            if len(names) > 1 and ctx.run_dir is not None:
                save_model(ctx.run_dir, name, state)
    return state


def _fmt_kb(n: float) -> str:
    return f"{n / 1000:.1f} kB"


def dssgd_section(by_method: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The report's DSSGD section: traffic per turn against a dense upload,
    staleness, and (under DP) how the privacy spent composes."""
    runs = {m: rows for m, rows in by_method.items() if m.split("-u")[0] == "dssgd"}
    if not runs:
        return []
    lines = [
        "## Distributed selective SGD",
        "",
        "| run | θu | θd | order | final accuracy | uploaded per turn | bytes up per "
        "turn | of a dense upload | bytes down per turn | staleness mean / max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, rows in runs.items():
        last = rows[-1]
        turns = sum(r["turns"] for r in rows)
        up = sum(r["bytes_up"] for r in rows) / turns
        down = sum(r["bytes_down"] for r in rows) / turns
        stale = sum(r["staleness_mean"] * r["turns"] for r in rows) / turns
        lines.append(
            f"| {method} | {last['upload_fraction']:g} | {last['download_fraction']:g} "
            f"| {last['order']} | {100 * last['accuracy']:.2f}% "
            f"| {last['uploaded_per_turn']:.0f} of {last['parameters']} "
            f"| {_fmt_kb(up)} | {100 * up / last['dense_upload_bytes']:.2f}% "
            f"| {_fmt_kb(down)} | {stale:.2f} / "
            f"{max(r['staleness_max'] for r in rows)} |"
        )
    lines += [
        "",
        "Bytes are the exact lengths of the encoded messages (safetensors: indices "
        "as int32 and values as float32, indices left out when every parameter is "
        "sent). A dense upload is the whole model as FedAvg sends it. Staleness: "
        "uploads applied by other clients between a client's download and its "
        "upload.",
        "",
    ]
    if any(rows[-1].get("residual") for rows in runs.values()):
        lines += [
            "Residual (error feedback) was on: each client kept what it did not "
            "upload and added it to its next turn's change before selecting. This is "
            "not part of Shokri & Shmatikov's algorithm.",
            "",
        ]
    return lines + _privacy_lines(runs)


def _privacy_lines(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    private = {m: rows[-1] for m, rows in runs.items() if "epsilon" in rows[-1]}
    if not private:
        return []
    lines = [
        "### What DSSGD's differential privacy spends",
        "",
        "| run | ε per parameter (the paper's figure) | ε per upload (pure) "
        "| uploads per client | per client: sum of pure ε | per client: ledger ε "
        "(δ) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, last in private.items():
        lines.append(
            f"| {method} | {last['epsilon_per_parameter']:g} "
            f"| {last['epsilon_upload']:.4g} | {last['uploads_max']} "
            f"| {last['epsilon_pure']:.4g} | {last['epsilon']:.4g} "
            f"({last['delta']:g}) |"
        )
    lines += [
        "",
        "The paper states its budget per uploaded parameter. That is not a "
        "guarantee for anyone: one upload of c parameters spends c times it, and "
        "every client spends that again at each of its uploads. What holds protects "
        "one example of one client (any change of it) against the server and every "
        "other client. Two valid upper bounds are given for the worst client: the "
        "sum of the pure epsilons of its uploads (an (ε, 0) guarantee) and its "
        "ledger's epsilon at δ; the smaller one is the guarantee. The ledger "
        "records each selection as the Laplace mechanism that dominates every "
        "mechanism of its pure ε, and each released value as the Laplace mechanism "
        "it is.",
        "",
    ]
    return lines
