"""The runner's ``dp-fedavg`` method: user-level DP for federated training.

Builds a :class:`veil.learning.DPFedAvg` from ``[dp_fedavg]`` and ``[local]``, runs
it in the simulation runtime, and logs per evaluation the accuracy, the user-level
epsilon spent so far (from the ledger, at ``delta``), the clipping norm and the
clients sampled. The ledger goes to ``RUN_DIR/privacy/dp-fedavg.json`` with what it
protects (one client) and the trust model (``central``: the server adds the noise;
``distributed``: the clients' shares sum to it; ``distributed + secure
aggregation``: the server sees only that sum, :mod:`veil.experiment._secure_dp_fedavg`),
where the report reads them.

Accounting follows the sampling: Poisson sampling under add/remove-one-client with
the configured accountant; fixed-size sampling with ``rdp`` under replace-one-client.
A missing ``noise_multiplier`` is calibrated so the planned rounds spend at most
``epsilon``; the budget is also enforced round by round.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING, Any

import dp_accounting as dpa

from veil.errors import BudgetExceededError, PrivacyError, UpdateError
from veil.experiment._dp import write_ledger
from veil.experiment._runtime import open_runtime
from veil.experiment._secure_dp_fedavg import SecureDPFedAvg, secure_dp_fedavg
from veil.experiment.config import DPFedAvgConfig, ExperimentConfig
from veil.learning import AdaptiveClipping, DPFedAvg, SGDTrainer, StateDict, evaluate
from veil.privacy import (
    PrivacyBudget,
    PrivacyEvent,
    PrivacyLedger,
    calibrate_noise_multiplier,
    make_accountant,
)
from veil.runtime import RoundStats

if TYPE_CHECKING:
    from veil.experiment.runner import RunContext

__all__ = [
    "build_dp_fedavg",
    "ledger_settings",
    "resolve_delta",
    "resolve_noise_multiplier",
    "run_dp_fedavg",
    "trust_model",
]

logger = logging.getLogger(__name__)

METHOD = "dp-fedavg"


def resolve_delta(cfg: DPFedAvgConfig, num_clients: int) -> float:
    """``cfg.delta`` (default ``0.1 / num_clients``), refused unless below
    ``1 / num_clients``: a larger delta allows releasing one client's data whole."""
    delta = 0.1 / num_clients if cfg.delta is None else cfg.delta
    if not delta < 1 / num_clients:
        raise PrivacyError(
            f"dp_fedavg.delta must be below 1 / num_clients = {1 / num_clients:.3g} "
            f"for a user-level guarantee, got {delta:g}"
        )
    return delta


def ledger_settings(cfg: DPFedAvgConfig) -> tuple[str, str]:
    """The (accountant, neighbouring relation) that fit the sampling."""
    if cfg.sampling == "fixed":
        return "rdp", "replace_one"
    return cfg.accountant, "add_or_remove_one"


def _sample_rate(cfg: DPFedAvgConfig, num_clients: int) -> float:
    """``q``; under fixed-size sampling rounded to a whole ``m / N`` (m >= 1)."""
    if cfg.sampling == "poisson":
        return cfg.sample_rate
    return max(round(cfg.sample_rate * num_clients), 1) / num_clients


def resolve_noise_multiplier(
    cfg: DPFedAvgConfig, num_clients: int, delta: float
) -> float:
    """``cfg.noise_multiplier``, or the smallest one whose ``cfg.rounds`` rounds
    spend at most ``cfg.epsilon`` at ``delta`` under the sampling's accountant."""
    if cfg.noise_multiplier is not None:
        return cfg.noise_multiplier
    assert cfg.epsilon is not None  # the config requires one of the two
    q = _sample_rate(cfg, num_clients)
    accountant, relation = ledger_settings(cfg)
    if cfg.sampling == "poisson":
        return calibrate_noise_multiplier(
            cfg.epsilon, q, cfg.rounds, delta, accountant, relation
        )

    def event(z: float) -> dpa.DpEvent:
        # Replace-one: the sum's sensitivity is 2 S, the event's multiplier z / 2.
        one = PrivacyEvent("gaussian", z / 2, q, cfg.rounds, population=num_clients)
        return one.to_dp_event()

    found = dpa.calibrate_dp_mechanism(
        lambda: make_accountant(accountant, relation),
        event,
        cfg.epsilon,
        delta,
        bracket_interval=dpa.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-3,
    )
    return float(found)


def build_dp_fedavg(
    config: ExperimentConfig, initial_state: StateDict, num_clients: int
) -> tuple[DPFedAvg, float]:
    """The algorithm for ``config`` and the delta its epsilon is stated at."""
    cfg = config.dp_fedavg
    assert cfg is not None  # the config requires the section for this method
    delta = resolve_delta(cfg, num_clients)
    noise = resolve_noise_multiplier(cfg, num_clients, delta)
    q = _sample_rate(cfg, num_clients)
    budget = None if cfg.epsilon is None else PrivacyBudget(cfg.epsilon, delta)
    adaptive = None
    if cfg.adaptive_clipping:
        # Andrew et al. use expected clients / 20; never below z, so that the count
        # takes at most a quarter of the round's noise budget.
        sigma_b = cfg.count_noise_multiplier or max(q * num_clients / 20, noise)
        adaptive = AdaptiveClipping(sigma_b, cfg.target_quantile, cfg.clipping_lr)
    local = config.local
    algorithm = DPFedAvg(
        global_state=copy.deepcopy(initial_state),
        num_clients=num_clients,
        sample_rate=q,
        clipping_norm=cfg.clipping_norm,
        noise_multiplier=noise,
        trainer=SGDTrainer(local.lr, local.epochs, local.batch_size),
        ledger=PrivacyLedger(*ledger_settings(cfg), budget),
        sampling=cfg.sampling,
        placement=cfg.placement,
        adaptive=adaptive,
        server_lr=cfg.server_lr,
        server_momentum=cfg.server_momentum,
        seed=config.seed,
        secure_noise=cfg.secure_noise,
    )
    if cfg.secure_aggregation:
        algorithm = secure_dp_fedavg(algorithm, config)
    logger.info(
        "dp-fedavg: noise_multiplier %.4f, sample_rate %.5g (%s), %s noise, delta %g",
        noise,
        q,
        cfg.sampling,
        cfg.placement,
        delta,
    )
    return algorithm, delta


def trust_model(cfg: DPFedAvgConfig) -> str:
    """Who the noise protects against, as the ledger file and report state it."""
    if cfg.secure_aggregation:
        return f"{cfg.placement} + secure aggregation"
    return cfg.placement


def run_dp_fedavg(ctx: RunContext) -> StateDict:
    """DP-FedAvg in the configured runtime; stops before a round over budget, or
    when a round's updates are refused (a diverged client), keeping the last model."""
    config = ctx.config
    cfg = config.dp_fedavg
    assert cfg is not None
    algorithm, delta = build_dp_fedavg(
        config, ctx.initial_state, len(ctx.client_indices)
    )
    model = ctx.new_model()
    test = ctx.dataset.test

    def secure_metrics() -> dict[str, Any]:
        if isinstance(algorithm, SecureDPFedAvg):
            return algorithm.take_metrics()
        return {}

    def log(rnd: int, stats: list[RoundStats], **extra: Any) -> None:
        model.load_state_dict(algorithm.global_state)
        accuracy, loss = evaluate(model, test.x, test.y)
        last = algorithm.history[-1] if algorithm.history else None
        ctx.metrics.log(
            method=METHOD,
            axis="round",
            round=rnd,
            accuracy=accuracy,
            loss=loss,
            train_loss=stats[-1].train_loss if stats else math.nan,
            clients=stats[-1].clients if stats else 0,
            bytes_up=sum(s.bytes_up for s in stats),
            bytes_down=sum(s.bytes_down for s in stats),
            seconds=sum(s.seconds for s in stats),
            epsilon=algorithm.ledger.epsilon(delta),
            delta=delta,
            noise_multiplier=algorithm.noise_multiplier,
            clipping_norm=None if last is None else last.clipping_norm,
            unclipped=None
            if last is None or math.isnan(last.unclipped)
            else last.unclipped,
            **secure_metrics(),
            **extra,
        )
        logger.info("dp-fedavg round %d: accuracy %.4f", rnd, accuracy)
        ctx.advance(METHOD, rnd, accuracy)

    with open_runtime(config, ctx.dataset.train, ctx.client_indices) as runtime:
        pending: list[RoundStats] = []
        for rnd in range(1, cfg.rounds + 1):
            try:
                pending.append(runtime.run_round(algorithm, rnd))
            except BudgetExceededError as exc:
                logger.warning("dp-fedavg stopped before round %d: %s", rnd, exc)
                log(rnd - 1, pending, stopped="budget")
                break
            except UpdateError as exc:
                # A diverged client (NaN) ends the run with the last good model; the
                # refused round released nothing, so the ledger is complete as it is.
                logger.warning("dp-fedavg stopped in round %d: %s", rnd, exc)
                log(rnd - 1, pending, stopped="refused")
                break
            if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                log(rnd, pending)
                pending = []
    if ctx.run_dir is not None:
        write_ledger(
            ctx.run_dir,
            METHOD,
            algorithm.ledger,
            delta,
            protects="one client",
            trust_model=trust_model(cfg),
        )
    return algorithm.global_state
