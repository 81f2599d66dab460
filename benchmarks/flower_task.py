"""The scale benchmark's task for Flower 1.42, the peer veil is measured against.

Flower's own simulation (``flwr.simulation.run_simulation``, Ray backend, the
Message API of Flower's quickstart: a ``ClientApp`` with a ``train`` function, a
``ServerApp`` running ``flwr.serverapp.strategy.FedAvg``) doing exactly the work of
``benchmarks/scale.py``'s bare loop: the tanh CNN, full MNIST split IID with the same
generator, E = 1, B = 10, lr 0.1, each client's batch order from the same seed, no
evaluation. Flower samples a round's clients itself; every client holds the same
number of examples, so the work per round is the same.

Kept as little as Flower lets it be: each Ray actor loads MNIST and builds its model
once and reuses them (Flower's quickstart builds them in every call); torch runs one
thread per actor. This module is imported by Flower's Ray actors, so it must be on
their ``PYTHONPATH`` (``scale.py`` sets it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

import numpy as np
import torch
from bare_loop import local_sgd

__all__ = ["run_flower"]

LR, BATCH = 0.1, 10


@cache
def _task(clients: int) -> tuple[Any, Any, list[torch.Tensor], torch.nn.Module]:
    """MNIST, the clients' indices and a scratch model, once per process."""
    from veil.data import iid, load_mnist
    from veil.models import build_model

    torch.set_num_threads(1)
    data = load_mnist()
    parts = iid(len(data.train), clients, np.random.default_rng(0))
    model = build_model("tanh-cnn")
    return data.train.x, data.train.y, [torch.as_tensor(p) for p in parts], model


def _train(msg: Any, context: Any) -> Any:
    """One client's local epoch, as the bare loop runs it."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    clients = int(context.node_config["num-partitions"])
    k = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    x, y, parts, model = _task(clients)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    g = torch.Generator().manual_seed(rnd * 1_000_003 + k)
    cx, cy = x[parts[k]], y[parts[k]]
    local_sgd(
        model, model.state_dict(), cx, cy, lr=LR, epochs=1, batch=BATCH, generator=g
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(cy)}),
        }
    )
    return Message(content=content, reply_to=msg)


Mark = Callable[[], tuple[float, float]]


def _strategy(per_round: int, clients: int, mark: Mark, marks: list[Any]) -> Any:
    """Flower's FedAvg, noting when each round starts and refusing failed clients."""
    from flwr.serverapp.strategy import FedAvg

    class TimedFedAvg(FedAvg):  # type: ignore[misc]
        def configure_train(self, server_round: int, *args: Any) -> Iterable[Any]:
            marks.append(mark())
            return super().configure_train(server_round, *args)  # type: ignore[no-any-return]

        def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> Any:
            replies = list(replies)
            failed = [m for m in replies if m.has_error()]
            if failed or len(replies) != per_round:
                reason = failed[0].error.reason if failed else "missing replies"
                raise RuntimeError(f"Flower round {server_round} failed: {reason}")
            return super().aggregate_train(server_round, replies)

    return TimedFedAvg(
        fraction_train=per_round / clients,
        fraction_evaluate=0.0,
        min_train_nodes=per_round,
        min_available_nodes=clients,
    )


def run_flower(
    clients: int, per_round: int, rounds: int, cpus: int, mark: Mark
) -> list[Any]:
    """Run Flower's simulation for ``rounds`` rounds; ``mark()`` at the start of
    each round and at the end."""
    from flwr.app import ArrayRecord, Context
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from veil.models import build_model

    logging.getLogger("flwr").setLevel(logging.WARNING)
    client_app = ClientApp()
    client_app.train()(_train)
    marks: list[Any] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        initial = ArrayRecord(build_model("tanh-cnn").state_dict())
        strategy = _strategy(per_round, clients, mark, marks)
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
        marks.append(mark())

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False},
        },
    )
    if len(marks) != rounds + 1:
        raise RuntimeError(f"Flower ran {len(marks) - 1} of {rounds} rounds")
    return marks
