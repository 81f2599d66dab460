"""The runner: from a validated config to a finished run directory.

``run_experiment`` loads the data, partitions it among clients, builds one initial
model shared by every method (so they start from the same weights), runs each method
named in the config, logs its metrics, saves its final model and writes the report.

Each method is a function of a :class:`RunContext` returning the final model's tensors,
registered in :data:`METHODS`:

- ``fedavg``: FedAvg over the simulation runtime (:mod:`veil.learning.fedavg`).
- ``centralized``: SGD on every client's data pooled on one machine.
- ``standalone``: every client trains alone on its own data; mean, min and max accuracy.
- ``fedavg`` with ``fedavg.secure_aggregation``: the server sees only the sum of the
  clients' weighted updates (:mod:`veil.experiment._secagg`).
- ``central-dp``: DP-SGD on the pooled data (:mod:`veil.experiment._dp`); with
  ``fedavg.local_dp`` FedAvg's clients train with DP-SGD, one ledger each. Ledgers
  are written to ``RUN_DIR/privacy/``.
- ``dssgd``: distributed selective SGD with a parameter server
  (:mod:`veil.experiment._dssgd`), once per upload fraction θu.
- ``dp-fedavg``: DP-FedAvg with user-level DP, adaptive clipping, central or
  distributed noise (:mod:`veil.experiment._dp_fedavg`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from veil._seeding import Stream, derive_seed, numpy_rng, torch_generator
from veil.data import FederatedDataset, load_dataset, partition
from veil.errors import BudgetExceededError, ConfigError
from veil.experiment._dp import client_privacy, run_central_dp, write_ledger
from veil.experiment._dp_fedavg import run_dp_fedavg
from veil.experiment._dssgd import run_dssgd
from veil.experiment._runtime import open_runtime
from veil.experiment._secagg import SecureFedAvg, secure_fedavg
from veil.experiment.config import METHOD_NAMES, ExperimentConfig, dump_config
from veil.experiment.report import write_report
from veil.experiment.rundir import MetricsLog, new_run_dir, save_model
from veil.learning import FedAvg, SGDTrainer, StateDict, evaluate
from veil.models import build_model
from veil.runtime import RoundStats

__all__ = [
    "METHODS",
    "RunContext",
    "initial_state",
    "run_centralized",
    "run_experiment",
    "run_fedavg",
    "run_standalone",
]

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every method of a run shares."""

    config: ExperimentConfig
    dataset: FederatedDataset
    client_indices: list[np.ndarray]
    initial_state: StateDict
    metrics: MetricsLog
    progress: Progress | None = None
    task_ids: dict[str, TaskID] = field(default_factory=dict)
    run_dir: Path | None = None

    def new_model(self) -> nn.Module:
        """The run's model architecture, loaded with the shared initial weights."""
        model = build_model(self.config.model.name)
        model.load_state_dict(self.initial_state)
        return model

    def advance(self, method: str, completed: int, accuracy: float) -> None:
        """Move the method's progress bar to ``completed`` steps."""
        if self.progress is not None and method in self.task_ids:
            self.progress.update(
                self.task_ids[method], completed=completed, acc=f"{accuracy:.2%}"
            )


def run_fedavg(ctx: RunContext) -> StateDict:
    """FedAvg in the configured runtime, evaluated on the test set every few rounds."""
    cfg = ctx.config
    local = cfg.local
    privacy = client_privacy(cfg, ctx.client_indices) if cfg.fedavg.local_dp else None
    algorithm = FedAvg(
        global_state=copy.deepcopy(ctx.initial_state),
        num_clients=len(ctx.client_indices),
        client_fraction=cfg.fedavg.client_fraction,
        trainer=SGDTrainer(local.lr, local.epochs, local.batch_size),
        seed=cfg.seed,
        trainer_for=None if privacy is None else privacy.trainer_for,
        client_states=privacy,
        server_lr=cfg.fedavg.server_lr,
        server_momentum=cfg.fedavg.server_momentum,
    )
    if cfg.fedavg.secure_aggregation:
        algorithm = secure_fedavg(algorithm, cfg, ctx.client_indices)
    model = ctx.new_model()
    test = ctx.dataset.test

    def log(rnd: int, stats: RoundStats, **extra: Any) -> None:
        model.load_state_dict(algorithm.global_state)
        accuracy, loss = evaluate(model, test.x, test.y)
        if privacy is not None:
            extra["epsilon"] = max(privacy.epsilons())
        if isinstance(algorithm, SecureFedAvg):
            extra.update(algorithm.take_metrics())
        ctx.metrics.log(
            method="fedavg",
            axis="round",
            round=rnd,
            accuracy=accuracy,
            loss=loss,
            train_loss=stats.train_loss,
            clients=stats.clients,
            bytes_up=stats.bytes_up,
            bytes_down=stats.bytes_down,
            seconds=stats.seconds,
            **extra,
        )
        logger.info("fedavg round %d: accuracy %.4f", rnd, accuracy)
        ctx.advance("fedavg", rnd, accuracy)

    with open_runtime(cfg, ctx.dataset.train, ctx.client_indices) as runtime:
        pending: list[RoundStats] = []  # rounds since the last evaluation
        for rnd in range(1, cfg.fedavg.rounds + 1):
            try:
                pending.append(runtime.run_round(algorithm, rnd))
            except BudgetExceededError as exc:
                # A client's next step would exceed its budget: this round is not
                # aggregated and the run ends with the model of the round before.
                logger.warning("fedavg stopped in round %d: %s", rnd, exc)
                log(rnd - 1, _merge(pending, rnd - 1), stopped="budget")
                break
            if rnd % cfg.fedavg.eval_every == 0 or rnd == cfg.fedavg.rounds:
                log(rnd, _merge(pending, rnd))
                pending = []
    if privacy is not None and ctx.run_dir is not None:
        write_ledger(ctx.run_dir, "fedavg", privacy.ledgers, privacy.delta)
    return algorithm.global_state


def _merge(rounds: list[RoundStats], rnd: int) -> RoundStats:
    """Several rounds' stats as one: traffic and time summed, the last round's loss
    and clients."""
    last = rounds[-1] if rounds else RoundStats(rnd, 0, 0, 0, math.nan, 0.0)
    return RoundStats(
        round=rnd,
        clients=last.clients,
        bytes_up=sum(r.bytes_up for r in rounds),
        bytes_down=sum(r.bytes_down for r in rounds),
        train_loss=last.train_loss,
        seconds=sum(r.seconds for r in rounds),
    )


def run_centralized(ctx: RunContext) -> StateDict:
    """SGD on all training data pooled, one evaluation per epoch.

    ``bytes_up`` of the first epoch counts the pooled training tensors: the raw data
    every client would have to upload for this baseline.
    """
    cfg = ctx.config
    c = cfg.centralized
    trainer = SGDTrainer(
        c.lr or cfg.local.lr, epochs=1, batch_size=c.batch_size or cfg.local.batch_size
    )
    model = ctx.new_model()
    train, test = ctx.dataset.train, ctx.dataset.test
    generator = torch_generator(cfg.seed, Stream.CENTRALIZED)
    raw_bytes = train.x.nbytes + train.y.nbytes
    for epoch in range(1, c.epochs + 1):
        start = time.perf_counter()
        stats = trainer.train(model, train.x, train.y, generator)
        accuracy, loss = evaluate(model, test.x, test.y)
        ctx.metrics.log(
            method="centralized",
            axis="epoch",
            round=epoch,
            accuracy=accuracy,
            loss=loss,
            train_loss=stats.loss,
            clients=len(ctx.client_indices),
            bytes_up=raw_bytes if epoch == 1 else 0,
            bytes_down=0,
            seconds=time.perf_counter() - start,
        )
        ctx.advance("centralized", epoch, accuracy)
    return model.state_dict()


def _standalone_clients(ctx: RunContext) -> list[int]:
    cap = ctx.config.standalone.max_clients
    k = len(ctx.client_indices)
    if cap is None or cap >= k:
        return list(range(k))
    rng = numpy_rng(ctx.config.seed, Stream.STANDALONE)
    return sorted(int(i) for i in rng.choice(k, cap, replace=False))


def run_standalone(ctx: RunContext) -> StateDict:
    """Each client trains alone; accuracy on the shared test set, mean/min/max.

    Returns the model of the client with the median accuracy.
    """
    cfg = ctx.config
    trainer = SGDTrainer(cfg.local.lr, cfg.standalone.epochs, cfg.local.batch_size)
    train, test = ctx.dataset.train, ctx.dataset.test
    start = time.perf_counter()
    results: list[tuple[float, float, int, StateDict]] = []
    for k in _standalone_clients(ctx):
        model = ctx.new_model()
        idx = torch.as_tensor(ctx.client_indices[k])
        generator = torch_generator(cfg.seed, Stream.STANDALONE, k)
        trainer.train(model, train.x[idx], train.y[idx], generator)
        accuracy, loss = evaluate(model, test.x, test.y)
        results.append((accuracy, loss, k, model.state_dict()))
        mean_accuracy = float(np.mean([r[0] for r in results]))
        ctx.advance("standalone", len(results), mean_accuracy)
    accs = np.array([r[0] for r in results])
    ctx.metrics.log(
        method="standalone",
        axis="epoch",
        round=cfg.standalone.epochs,
        accuracy=float(accs.mean()),
        accuracy_min=float(accs.min()),
        accuracy_max=float(accs.max()),
        loss=float(np.mean([r[1] for r in results])),
        clients=len(results),
        bytes_up=0,
        bytes_down=0,
        seconds=time.perf_counter() - start,
    )
    median = sorted(results, key=lambda r: r[0])[len(results) // 2]
    return median[3]


MethodFn = Callable[[RunContext], StateDict]
METHODS: dict[str, MethodFn] = {
    "centralized": run_centralized,
    "central-dp": run_central_dp,
    "standalone": run_standalone,
    "fedavg": run_fedavg,
    "dssgd": run_dssgd,
    "dp-fedavg": run_dp_fedavg,
}


def _method_steps(config: ExperimentConfig, method: str, num_clients: int) -> int:
    if method == "fedavg":
        return config.fedavg.rounds
    if method == "centralized":
        return config.centralized.epochs
    if method == "central-dp":
        return config.central_dp.epochs
    if method == "dssgd":
        return config.dssgd.rounds * len(config.dssgd.upload_fractions)
    if method == "dp-fedavg" and config.dp_fedavg is not None:
        return config.dp_fedavg.rounds
    cap = config.standalone.max_clients
    return num_clients if cap is None else min(cap, num_clients)


def initial_state(config: ExperimentConfig) -> StateDict:
    """The initial weights every method starts from (seeded by the run's seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(config.seed, Stream.MODEL_INIT))
        return build_model(config.model.name).state_dict()


def run_experiment(
    config: ExperimentConfig,
    out_root: str | Path = "runs",
    *,
    run_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Run every method of ``config``; return the run directory.

    Args:
        config: the validated experiment.
        out_root: where a new run directory is created (ignored with ``run_dir``).
        run_dir: write into this (empty or new) folder instead.
        data_dir: folder holding the datasets; overrides ``data.data_dir``.
        progress: show a rich progress bar on the terminal.
    """
    dataset = load_dataset(config.data.dataset, data_dir or config.data.data_dir)
    d = config.data
    clients = partition(
        d.partition,
        dataset.train.y.numpy(),
        d.num_clients,
        numpy_rng(config.seed, Stream.PARTITION),
        users=dataset.train.users,
        alpha=d.alpha,
        shards_per_client=d.shards_per_client,
    )
    if run_dir is None:
        path = new_run_dir(out_root, config.name)
    else:
        path = Path(run_dir)
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise ConfigError(f"run directory {path} is not empty; choose a new one")
    (path / "config.toml").write_text(dump_config(config))
    metrics = MetricsLog(path / "metrics.jsonl")
    methods = [m for m in METHOD_NAMES if m in config.methods]

    bar: AbstractContextManager[Progress | None] = nullcontext(None)
    if progress:
        bar = Progress(
            TextColumn("[bold]{task.description:<12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("acc {task.fields[acc]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
        )
    with bar as prog:
        ctx = RunContext(
            config, dataset, clients, initial_state(config), metrics, prog, run_dir=path
        )
        if prog is not None:
            for m in methods:
                total = _method_steps(config, m, len(clients))
                ctx.task_ids[m] = prog.add_task(m, total=total, acc="-")
        for method in methods:
            logger.info("running %s", method)
            state = METHODS[method](ctx)
            save_model(path, method, state)
    write_report(path)
    return path
