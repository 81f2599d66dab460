"""What every runtime offers: run one round of a federated algorithm, or one turn.

A federated algorithm (FedAvg, and those built on it) is split into a server side,
``configure_round`` and ``aggregate``, and a client side, ``client_fit``. A runtime
only decides where ``client_fit`` runs and how tasks and results travel.

Algorithms whose clients take turns, one after another, against a server that
changes after every turn (distributed selective SGD), use :class:`TurnRuntime`
instead: the driver runs the server side itself and asks the runtime to run one
client's step, ``fn(state, model, x, y, *args) -> (state, reply)``, where the
client's data is. The client's state (its local parameters, its privacy ledger)
persists between turns; a runtime may keep it where the client runs and hand the
driver only a handle, which :meth:`TurnRuntime.fetch` resolves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from veil.errors import DataError
from veil.learning._types import ClientResult, ClientTask
from veil.learning.encoding import encoded_size

__all__ = [
    "ClientStep",
    "FederatedAlgorithm",
    "RoundStats",
    "Runtime",
    "TurnRuntime",
    "check_client",
    "check_clients",
    "client_state_hooks",
    "round_stats",
]


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


def check_client(client_id: int, num_clients: int) -> None:
    """Refuse, before any work, a client the runtime does not hold."""
    if not 0 <= client_id < num_clients:
        raise DataError(f"client_id must be in [0, {num_clients}), got {client_id}")


def check_clients(tasks: Sequence[ClientTask], num_clients: int) -> None:
    """Refuse, before any work, a task for a client the runtime does not hold."""
    for task in tasks:
        check_client(task.client_id, num_clients)


def round_stats(
    rnd: int,
    tasks: Sequence[ClientTask],
    results: Sequence[ClientResult],
    seconds: float,
) -> RoundStats:
    """What a round cost: clients aggregated, safetensors bytes each way, the
    example-weighted training loss, wall-clock seconds."""
    weights = sum(r.num_examples for r in results)
    loss = sum(r.loss * r.num_examples for r in results) / max(weights, 1)
    return RoundStats(
        round=rnd,
        clients=len(results),
        bytes_up=sum(encoded_size(r.update) for r in results),
        bytes_down=sum(encoded_size(t.global_state) for t in tasks),
        train_loss=loss,
        seconds=seconds,
    )


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


#: One client's step of a turn-based algorithm: ``fn(state, model, x, y, *args)``
#: returns ``(state, reply)``: the client's state after the step (the same object,
#: changed, or a new one) and what it sends back. ``model`` is a scratch model the
#: step may overwrite; ``x`` and ``y`` are the client's examples.
ClientStep = Callable[..., tuple[Any, Any]]


class TurnRuntime(Protocol):
    """Runs one client's step at a time, where the client's data is."""

    def run_client(
        self, fn: ClientStep, client_id: int, state: Any, *args: Any
    ) -> tuple[Any, Any]:
        """``fn(state, model, x, y, *args)`` for client ``client_id``: returns a
        handle on the client's new state (pass it to the client's next step) and
        the reply."""
        ...

    def fetch(self, states: Sequence[Any]) -> list[Any]:
        """The client states that ``states`` (handles from :meth:`run_client`, or
        states never sent anywhere) stand for."""
        ...
