"""The runner's differentially private methods and their privacy records.

Two uses of DP-SGD (:class:`veil.privacy.DPSGDTrainer`) in ``veil run``:

- ``central-dp``: DP-SGD on every client's data pooled on one machine (Abadi et al.
  2016). One ledger; epsilon protects one example of the pooled set.
- ``fedavg`` with ``fedavg.local_dp = true``: each client trains with DP-SGD on its
  own examples and keeps its own ledger (the ledger would live on the phone). Epsilon
  protects one example of one client, against whoever sees the client's updates.

Both take ``[dp]``: the budget ``(epsilon, delta)`` is enforced by the ledgers, and a
missing ``noise_multiplier`` is calibrated so the planned training spends at most
``epsilon``. Every ledger is written to ``RUN_DIR/privacy/`` as JSON
(:data:`veil.privacy.LEDGER_FORMAT`), where the report reads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from veil._seeding import Stream, torch_generator
from veil.errors import BudgetExceededError, PrivacyError
from veil.experiment.config import DPConfig, ExperimentConfig
from veil.learning import LocalTrainer, StateDict, TrainStats, evaluate
from veil.privacy import (
    DPSGDTrainer,
    PrivacyBudget,
    PrivacyLedger,
    calibrate_noise_multiplier,
)

if TYPE_CHECKING:
    from veil.experiment.runner import RunContext

__all__ = [
    "PRIVACY_FORMAT",
    "ClientPrivacy",
    "client_privacy",
    "read_privacy",
    "run_central_dp",
    "write_ledger",
]

logger = logging.getLogger(__name__)

#: Format tag of ``privacy/<method>.json``: ``delta`` and either one ``ledger`` or
#: ``clients``, one ledger per client id.
PRIVACY_FORMAT = "veil.run-privacy/1"


def _ledger(dp: DPConfig) -> PrivacyLedger:
    budget = None if dp.epsilon is None else PrivacyBudget(dp.epsilon, dp.delta)
    return PrivacyLedger(dp.accountant, dp.relation, budget)


def _noise_multiplier(dp: DPConfig, plans: set[tuple[float, int]]) -> float:
    """``dp.noise_multiplier``, or the smallest one meeting ``dp.epsilon`` for every
    planned (sample rate, steps) pair."""
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    assert dp.epsilon is not None  # the config requires one of the two
    return max(
        calibrate_noise_multiplier(
            dp.epsilon, q, steps, dp.delta, dp.accountant, dp.relation
        )
        for q, steps in sorted(plans)
    )


def _trainer(dp: DPConfig, noise_multiplier: float, **kwargs: Any) -> DPSGDTrainer:
    return DPSGDTrainer(
        clipping_norm=dp.clipping_norm,
        noise_multiplier=noise_multiplier,
        secure_noise=dp.secure_noise,
        engine=dp.engine,
        max_physical_batch=dp.max_physical_batch,
        **kwargs,
    )


def _cosine_lr(lr: float, final_lr: float | None, epoch: int, epochs: int) -> float:
    if final_lr is None:
        return lr
    progress = (epoch - 1) / max(epochs - 1, 1)
    return final_lr + (lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def run_central_dp(ctx: RunContext) -> StateDict:
    """DP-SGD on the pooled training set, one evaluation (and epsilon) per epoch.

    Stops before the step that would exceed the budget, logging that epoch's partial
    result with ``stopped = "budget"``.
    """
    cfg = ctx.config
    assert cfg.dp is not None
    c, dp = cfg.central_dp, cfg.dp
    train, test = ctx.dataset.train, ctx.dataset.test
    q = c.expected_batch_size / len(train)
    steps_per_epoch = max(1, round(1 / q))
    noise = _noise_multiplier(dp, {(q, steps_per_epoch * c.epochs)})
    ledger = _ledger(dp)
    trainer = _trainer(
        dp,
        noise,
        lr=c.lr,
        sample_rate=q,
        steps=steps_per_epoch,
        momentum=c.momentum,
        ledger=ledger,
        source="central-dp",
    )
    logger.info(
        "central-dp: noise_multiplier %.4f, sample_rate %.6f, %d steps per epoch",
        noise,
        q,
        steps_per_epoch,
    )
    model = ctx.new_model()
    generator = torch_generator(cfg.seed, Stream.CENTRAL_DP)
    for epoch in range(1, c.epochs + 1):
        start = time.perf_counter()
        # The learning rate is post-processing: it does not touch the accounting.
        lr = _cosine_lr(c.lr, c.final_lr, epoch, c.epochs)
        stopped: str | None = None
        stats: TrainStats | None
        try:
            stats = dataclasses.replace(trainer, lr=lr).train(
                model, train.x, train.y, generator
            )
        except BudgetExceededError as exc:
            logger.warning("central-dp: %s", exc)
            stopped = "budget"
            stats = exc.result if isinstance(exc.result, TrainStats) else None
        accuracy, loss = evaluate(model, test.x, test.y)
        ctx.metrics.log(
            method="central-dp",
            axis="epoch",
            round=epoch,
            accuracy=accuracy,
            loss=loss,
            train_loss=None if stats is None else stats.loss,
            clients=len(ctx.client_indices),
            bytes_up=train.x.nbytes + train.y.nbytes if epoch == 1 else 0,
            bytes_down=0,
            seconds=time.perf_counter() - start,
            epsilon=ledger.epsilon(dp.delta),
            noise_multiplier=noise,
            stopped=stopped,
        )
        ctx.advance("central-dp", epoch, accuracy)
        if stopped:
            break
    if ctx.run_dir is not None:
        write_ledger(ctx.run_dir, "central-dp", ledger, dp.delta)
    return model.state_dict()


@dataclasses.dataclass
class ClientPrivacy:
    """DP-SGD for FedAvg's clients: one trainer template, one ledger per client."""

    trainer: DPSGDTrainer
    ledgers: dict[int, PrivacyLedger]
    delta: float

    def trainer_for(self, client_id: int) -> LocalTrainer:
        """The client's trainer, recording into the client's own ledger."""
        return self.trainer.with_ledger(self.ledgers[client_id])

    def client_state(self, client_id: int) -> dict[str, Any]:
        """The client's ledger as JSON-able values (it travels with the client)."""
        return self.ledgers[client_id].to_dict()

    def load_client_state(self, client_id: int, state: dict[str, Any]) -> None:
        """Replace the client's ledger by one returned from where it ran."""
        self.ledgers[client_id] = PrivacyLedger.from_dict(state)

    def epsilons(self) -> list[float]:
        """Each client's epsilon at ``delta`` (0 for a client that never trained)."""
        return [ledger.epsilon(self.delta) for ledger in self.ledgers.values()]


def client_privacy(
    config: ExperimentConfig, client_indices: list[np.ndarray]
) -> ClientPrivacy:
    """DP-SGD trainers and ledgers for ``fedavg.local_dp``.

    A client's sample rate is ``local.batch_size / n_k`` on its own ``n_k`` examples.
    A calibrated noise multiplier assumes the client takes part in every round.
    """
    dp, local = config.dp, config.local
    assert dp is not None
    sizes = {len(idx) for idx in client_indices}
    template = _trainer(
        dp,
        0.0,
        lr=local.lr,
        expected_batch_size=local.batch_size,
        epochs=local.epochs,
        source="fedavg-client",
    )
    plans = {
        (
            template.resolve_sample_rate(n),
            template.planned_steps(n) * config.fedavg.rounds,
        )
        for n in sizes
    }
    noise = _noise_multiplier(dp, plans)
    logger.info("fedavg clients: DP-SGD with noise_multiplier %.4f", noise)
    trainer = dataclasses.replace(template, noise_multiplier=noise)
    ledgers = {k: _ledger(dp) for k in range(len(client_indices))}
    return ClientPrivacy(trainer, ledgers, dp.delta)


def write_ledger(
    run_dir: Path,
    name: str,
    ledger: PrivacyLedger | dict[int, PrivacyLedger],
    delta: float,
    **notes: str,
) -> Path:
    """Write one ledger, or one per client, to ``RUN_DIR/privacy/NAME.json`` (format
    :data:`PRIVACY_FORMAT`, with the ``delta`` at which the report states epsilon).
    ``notes`` (``protects``, ``trust_model``) are stored beside it for the report."""
    folder = run_dir / "privacy"
    folder.mkdir(exist_ok=True)
    record: dict[str, Any] = {"format": PRIVACY_FORMAT, "delta": delta, **notes}
    if isinstance(ledger, PrivacyLedger):
        record["ledger"] = ledger.to_dict()
    else:
        record["clients"] = {str(k): v.to_dict() for k, v in ledger.items()}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record) + "\n")
    return path


def read_privacy(run_dir: Path) -> dict[str, dict[str, Any]]:
    """What the report shows of each file in ``RUN_DIR/privacy/``, by method.

    For a single ledger: its :meth:`~veil.privacy.PrivacyLedger.summary` and the
    noise multipliers and sample rates of its Gaussian events. For client ledgers: the
    same for the client with the largest epsilon (``worst_client``), with the median
    epsilon and the number of clients that trained.
    """
    folder = run_dir / "privacy"
    if not folder.is_dir():
        return {}
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("format") != PRIVACY_FORMAT:
            raise PrivacyError(
                f"{path}: format must be {PRIVACY_FORMAT!r}, got {data.get('format')!r}"
            )
        delta = float(data["delta"])
        if "ledger" in data:
            ledger = PrivacyLedger.from_dict(data["ledger"])
            out[path.stem] = _ledger_summary(ledger, delta)
        else:
            ledgers = {
                int(k): PrivacyLedger.from_dict(v) for k, v in data["clients"].items()
            }
            out[path.stem] = _clients_summary(ledgers, delta)
        for note in ("protects", "trust_model"):
            if note in data:
                out[path.stem][note] = str(data[note])
    return out


def _ledger_summary(ledger: PrivacyLedger, delta: float) -> dict[str, Any]:
    summary = ledger.summary(delta)
    gaussian = [e for e in ledger.events if e.mechanism == "gaussian"]
    # A ledger of Laplace releases only (DSSGD) shows those instead.
    shown = gaussian or list(ledger.events)
    summary["noise_multiplier"] = sorted({e.noise_multiplier for e in shown})
    summary["sample_rate"] = sorted({e.sample_rate for e in shown})
    summary["steps"] = sum(e.count for e in shown)
    return summary


def _clients_summary(ledgers: dict[int, PrivacyLedger], delta: float) -> dict[str, Any]:
    trained = {k: v for k, v in ledgers.items() if v.events}
    if not trained:
        return {"clients_trained": 0, "epsilon": 0.0, "delta": delta}
    eps = {k: v.epsilon(delta) for k, v in trained.items()}
    worst = max(eps, key=lambda k: eps[k])
    summary = _ledger_summary(trained[worst], delta)
    summary["worst_client"] = worst
    summary["median_epsilon"] = float(np.median(list(eps.values())))
    summary["clients_trained"] = len(trained)
    return summary
