"""Federated Averaging (McMahan et al. 2017).

Each round the server picks ``m = max(round(C * K), 1)`` of its ``K`` clients at random,
sends them the global model, lets each train locally (:mod:`veil.learning.local`) and
replaces the global model by the average of the returned models, weighted by the number
of examples each client holds. In terms of updates (local minus global):

    w_{t+1} = w_t + sum_k n_k * delta_k / sum_k n_k

With ``server_lr`` and ``server_momentum`` (FedAvgM, Hsu et al. 2019) the server
steps on that mean with momentum instead (:mod:`veil.learning.server_opt`); the
defaults (1 and 0) are the plain average above.

The server validates every update before it touches the global model: tensor names and
shapes must match, values must be finite, and the total weight must be positive;
otherwise :class:`~veil.errors.UpdateError` is raised and the model is left unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from veil._seeding import Stream, derive_seed, numpy_rng
from veil.errors import ConfigError, UpdateError
from veil.learning._types import ClientResult, ClientTask, StateDict
from veil.learning.local import LocalTrainer
from veil.learning.server_opt import check_server_optimizer, server_step

__all__ = ["ClientStates", "FedAvg", "check_update", "weighted_average"]

logger = logging.getLogger(__name__)


def check_update(
    update: StateDict, reference: StateDict, who: str = "update", finite: bool = True
) -> None:
    """Refuse an update whose names, shapes or dtypes differ from ``reference``, or
    (unless ``finite`` is False: the caller checks that itself) that holds NaN or
    Inf."""
    if update.keys() != reference.keys():
        missing = sorted(reference.keys() - update.keys())
        extra = sorted(update.keys() - reference.keys())
        raise UpdateError(
            f"{who} must hold exactly the model's tensors; missing {missing}, "
            f"unexpected {extra}"
        )
    for name, ref in reference.items():
        t = update[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise UpdateError(
                f"{who}: tensor {name!r} must be {ref.dtype} of shape "
                f"{tuple(ref.shape)}, got {t.dtype} of shape {tuple(t.shape)}"
            )
        if finite and not bool(torch.isfinite(t).all()):
            raise UpdateError(f"{who}: tensor {name!r} holds NaN or Inf")


def weighted_average(
    updates: Sequence[StateDict], weights: Sequence[float], reference: StateDict
) -> StateDict:
    """``sum_k w_k * u_k / sum_k w_k``, after checking every update.

    Args:
        updates: one state dict per client, each shaped like ``reference``.
        weights: one non-negative, finite weight per update (example counts).
        reference: the global model's tensors, used to check names and shapes.

    Raises:
        UpdateError: no update, a bad weight, weights summing to zero, or an update
            that fails :func:`check_update`. Nothing is modified.
    """
    if len(updates) == 0:
        raise UpdateError("cannot average zero updates")
    if len(updates) != len(weights):
        raise UpdateError(
            f"need one weight per update, got {len(weights)} for {len(updates)}"
        )
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        if not (math.isfinite(w) and w >= 0):
            raise UpdateError(f"weight of update {i} must be finite and >= 0, got {w}")
        # Values of weighted updates are checked in the sum, once, below.
        check_update(u, reference, who=f"update {i}", finite=not w)
    total = float(sum(weights))
    if total <= 0:
        raise UpdateError("the weights of the updates sum to zero: nothing to average")
    averaged: StateDict = {}
    for name in reference:
        acc = torch.zeros_like(reference[name], dtype=torch.float64)
        for u, w in zip(updates, weights, strict=True):
            if w:
                acc.add_(u[name].to(torch.float64), alpha=w / total)
        averaged[name] = acc.to(reference[name].dtype)
    if not all(bool(torch.isfinite(a).all()) for a in averaged.values()):
        _refuse_non_finite(updates, reference)
    return averaged


def _refuse_non_finite(updates: Sequence[StateDict], reference: StateDict) -> None:
    """Name the first update holding NaN or Inf (the sum showed there is one).

    A NaN or Inf in any weighted update makes the float64 sum non-finite: finite
    float32 values times weights at most 1 cannot overflow float64, and NaN and Inf
    survive addition (Inf - Inf is NaN). So one check of the sum stands for a check
    of every update, and this scan runs only when an update is to be refused.
    """
    for i, u in enumerate(updates):
        check_update(u, reference, who=f"update {i}")
    raise UpdateError("the weighted sum of the updates holds NaN or Inf")


class ClientStates(Protocol):
    """State each client keeps between rounds (a DP client's privacy ledger), as
    plain JSON-able values, so it can travel with a client run out of process."""

    def client_state(self, client_id: int) -> Any: ...

    def load_client_state(self, client_id: int, state: Any) -> None: ...


@dataclass
class FedAvg:
    """The FedAvg server and client logic, free of I/O.

    Attributes:
        global_state: the global model's tensors; replaced after every round.
        num_clients: K, the number of clients.
        client_fraction: C in (0, 1], the fraction of clients per round.
        trainer: the local trainer each client runs.
        seed: the run's seed.
        trainer_for: the trainer of one client, by id, when clients differ (DP-SGD
            clients each record into their own privacy ledger); ``None`` (default)
            gives every client ``trainer``.
        client_states: where clients keep state between rounds, when they do;
            runtimes that run clients outside this process (Ray) carry it through
            :meth:`client_state` and :meth:`load_client_state`.
        server_lr: server learning rate on the mean update, > 0; default 1.
        server_momentum: server momentum in [0, 1); default 0 (plain FedAvg).
    """

    global_state: StateDict
    num_clients: int
    client_fraction: float
    trainer: LocalTrainer
    seed: int = 0
    trainer_for: Callable[[int], LocalTrainer] | None = None
    client_states: ClientStates | None = None
    server_lr: float = 1.0
    server_momentum: float = 0.0
    _velocity: StateDict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_server_optimizer(self.server_lr, self.server_momentum)
        if not 0 < self.client_fraction <= 1:
            raise ConfigError(
                f"client_fraction must be in (0, 1], got {self.client_fraction}"
            )
        if self.num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {self.num_clients}")

    @property
    def clients_per_round(self) -> int:
        return max(round(self.client_fraction * self.num_clients), 1)

    def client_state(self, client_id: int) -> Any:
        """The state client ``client_id`` keeps between rounds, or ``None``."""
        if self.client_states is None:
            return None
        return self.client_states.client_state(client_id)

    def load_client_state(self, client_id: int, state: Any) -> None:
        """Replace client ``client_id``'s state by ``state`` (from
        :meth:`client_state`, after the client ran elsewhere)."""
        if self.client_states is not None and state is not None:
            self.client_states.load_client_state(client_id, state)

    def configure_round(self, rnd: int) -> list[ClientTask]:
        """Choose this round's clients and the task each of them gets."""
        rng = numpy_rng(self.seed, Stream.CLIENT_SAMPLING, rnd)
        chosen = rng.choice(self.num_clients, self.clients_per_round, replace=False)
        return [
            ClientTask(
                client_id=int(k),
                round=rnd,
                seed=derive_seed(self.seed, Stream.LOCAL_TRAINING, rnd, int(k)),
                global_state=self.global_state,
            )
            for k in sorted(chosen)
        ]

    def client_fit(
        self, task: ClientTask, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> ClientResult:
        """Train ``model`` from the task's global state on the client's data."""
        model.load_state_dict(task.global_state)
        generator = torch.Generator().manual_seed(task.seed)
        trainer = (
            self.trainer
            if self.trainer_for is None
            else self.trainer_for(task.client_id)
        )
        stats = trainer.train(model, x, y, generator)
        with torch.no_grad():
            update = {
                name: value.detach() - task.global_state[name]
                for name, value in model.state_dict().items()
            }
        return ClientResult(
            task.client_id,
            task.round,
            update,
            len(y),
            stats.loss,
            {"steps": float(stats.steps)},
        )

    def apply_mean(self, mean: StateDict) -> None:
        """Take the server step on the round's mean update (plain addition with the
        default ``server_lr = 1`` and ``server_momentum = 0``)."""
        self.global_state, self._velocity = server_step(
            self.global_state,
            mean,
            self._velocity,
            self.server_lr,
            self.server_momentum,
        )

    def aggregate(self, rnd: int, results: Sequence[ClientResult]) -> None:
        """Apply the example-weighted mean of the updates to the global model.

        Raises:
            UpdateError: a result from another round, or an update refused by
                :func:`weighted_average`; the global model is left unchanged.
        """
        for r in results:
            if r.round != rnd:
                raise UpdateError(
                    f"client {r.client_id} sent an update for round {r.round} "
                    f"during round {rnd}"
                )
        mean = weighted_average(
            [r.update for r in results],
            [float(r.num_examples) for r in results],
            self.global_state,
        )
        self.apply_mean(mean)
        logger.info("round %d: aggregated %d updates", rnd, len(results))
