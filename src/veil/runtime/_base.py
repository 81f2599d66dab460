"""What every runtime offers: run one round of a federated algorithm.

A federated algorithm (FedAvg, and those built on it) is split into a server side,
``configure_round`` and ``aggregate``, and a client side, ``client_fit``. A runtime
only decides where ``client_fit`` runs and how tasks and results travel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from veil.learning._types import ClientResult, ClientTask

__all__ = ["FederatedAlgorithm", "RoundStats", "Runtime"]


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


class Runtime(Protocol):
    """Runs rounds of a :class:`FederatedAlgorithm`."""

    def run_round(self, algorithm: FederatedAlgorithm, rnd: int) -> RoundStats: ...
