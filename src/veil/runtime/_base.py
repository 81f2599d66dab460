"""What every runtime offers: run one round of a federated algorithm.

A federated algorithm (FedAvg, and those built on it) is split into a server side,
``configure_round`` and ``aggregate``, and a client side, ``client_fit``. A runtime
only decides where ``client_fit`` runs and how tasks and results travel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from veil.learning._types import ClientResult, ClientTask

__all__ = ["FederatedAlgorithm", "RoundStats", "Runtime", "client_state_hooks"]


class FederatedAlgorithm(Protocol):
    """The three steps of a round, as a runtime sees them."""

    def configure_round(self, rnd: int) -> list[ClientTask]: ...

    def client_fit(
        self, task: ClientTask, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> ClientResult: ...

    def aggregate(self, rnd: int, results: Sequence[ClientResult]) -> None: ...


@dataclass(frozen=True)
class RoundStats:
    """What a runtime measured in one round.

    Attributes:
        round: the round number.
        clients: number of clients whose result was aggregated.
        bytes_up: bytes sent by clients (sum of encoded results).
        bytes_down: bytes sent to clients (sum of encoded tasks).
        train_loss: example-weighted mean of the clients' training loss.
        seconds: wall-clock time of the round.
    """

    round: int
    clients: int
    bytes_up: int
    bytes_down: int
    train_loss: float
    seconds: float


def _no_state(client_id: int) -> None:
    return None


def _ignore_state(client_id: int, state: Any) -> None:
    return None


def client_state_hooks(
    algorithm: object,
) -> tuple[Callable[[int], Any], Callable[[int, Any], None]]:
    """``(client_state, load_client_state)`` of an algorithm whose clients keep state
    between rounds (a DP client's privacy ledger), or two no-ops.

    A runtime that runs a client outside this process (Ray, a phone) sends the
    algorithm with the client's state and loads the state the client returns, so
    the driver's copy stays the one that counts.
    """
    get = getattr(algorithm, "client_state", None)
    load = getattr(algorithm, "load_client_state", None)
    if get is None or load is None:
        return _no_state, _ignore_state
    return get, load


class Runtime(Protocol):
    """Runs rounds of a :class:`FederatedAlgorithm`."""

    def run_round(self, algorithm: FederatedAlgorithm, rnd: int) -> RoundStats: ...
