"""The messages that pass between a server and its clients.

A :class:`ClientTask` is what a client downloads for a round; a :class:`ClientResult`
is what it sends back. Both hold tensors by name, as safetensors would, so any runtime
can move them across a process or network boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ClientResult", "ClientTask", "StateDict"]

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientTask:
    """The work one client is asked to do in one round.

    Attributes:
        client_id: index of the client, ``0..num_clients-1``.
        round: the round number, from 1.
        seed: the client's training seed for this round (from the run's seed).
        global_state: the global model's tensors, by name.
        settings: round settings the server sends with the task, by name (DP-FedAvg:
            the clipping norm and each client's noise share); empty for FedAvg.
    """

    client_id: int
    round: int
    seed: int
    global_state: StateDict
    settings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientResult:
    """What one client returns after local training.

    Attributes:
        client_id: the client that trained.
        round: the round the result belongs to.
        update: local model minus the downloaded global model, by tensor name.
        num_examples: examples the client trained on (its FedAvg weight).
        loss: mean training loss over the client's local steps.
        metrics: further per-client numbers (steps, seconds, ...).
    """

    client_id: int
    round: int
    update: StateDict
    num_examples: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
