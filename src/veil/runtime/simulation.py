"""The simulation runtime: every client is an object in this process.

Clients run one after another and messages travel as function calls, so a round costs
what its local training costs and little more. One scratch model is reused by every
client (its parameters are overwritten by each task's global state), and a client's
examples are gathered from the one shared training set when it runs.

For a given seed the result does not depend on the order clients run in: each client's
randomness comes from its own seed in the task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from veil.data import Dataset
from veil.errors import DataError
from veil.runtime._base import (
    FederatedAlgorithm,
    RoundStats,
    check_clients,
    round_stats,
)

__all__ = ["SimulationRuntime"]


class SimulationRuntime:
    """Runs every client of a round in this process, one after another.

    Args:
        model_fn: builds the model architecture clients train (weights are
            overwritten by each task).
        train: the training set.
        client_indices: for each client, the indices of its examples in ``train``.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        train: Dataset,
        client_indices: Sequence[np.ndarray],
    ) -> None:
        empty = [k for k, idx in enumerate(client_indices) if len(idx) == 0]
        if empty:
            raise DataError(
                f"clients {empty[:10]} have no examples; choose fewer clients or "
                "another partition"
            )
        self._model = model_fn()
        self._x, self._y = train.x, train.y
        self._indices = [
            torch.as_tensor(np.asarray(i, dtype=np.int64)) for i in client_indices
        ]

    @property
    def num_clients(self) -> int:
        return len(self._indices)

    def client_data(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's features and labels."""
        idx = self._indices[client_id]
        return self._x[idx], self._y[idx]

    def run_round(self, algorithm: FederatedAlgorithm, rnd: int) -> RoundStats:
        """Configure, run every chosen client, aggregate; return what was measured."""
        start = time.perf_counter()
        tasks = algorithm.configure_round(rnd)
        check_clients(tasks, self.num_clients)
        results = []
        for task in tasks:
            x, y = self.client_data(task.client_id)
            results.append(algorithm.client_fit(task, self._model, x, y))
        algorithm.aggregate(rnd, results)
        return round_stats(rnd, tasks, results, time.perf_counter() - start)
