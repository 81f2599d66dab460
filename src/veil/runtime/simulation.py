"""The simulation runtime: every client is an object in this process.

Clients run one after another and messages travel as function calls, so a round costs
what its local training costs and little more. One scratch model is reused by every
client (its parameters are overwritten by each task's global state), and a client's
examples are gathered from the one shared training set when it runs.

For a given seed the result does not depend on the order clients run in: each client's
randomness comes from its own seed in the task.

Turn-based algorithms (DSSGD) call :meth:`SimulationRuntime.run_client` for one
client's step; client states stay the driver's own objects. It may be called from
several threads at once (DSSGD's asynchronous order): each thread gets its own
scratch model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.data import Dataset
from veil.errors import DataError
from veil.runtime._base import (
    ClientStep,
    FederatedAlgorithm,
    RoundStats,
    check_client,
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
        self._model_fn = model_fn
        self._local = threading.local()
        self._local.model = model_fn()
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

    def _scratch(self) -> nn.Module:
        # One scratch model per thread: every task overwrites its weights.
        model: nn.Module | None = getattr(self._local, "model", None)
        if model is None:
            model = self._local.model = self._model_fn()
        return model

    def run_round(self, algorithm: FederatedAlgorithm, rnd: int) -> RoundStats:
        """Configure, run every chosen client, aggregate; return what was measured."""
        start = time.perf_counter()
        tasks = algorithm.configure_round(rnd)
        check_clients(tasks, self.num_clients)
        model = self._scratch()
        results = []
        for task in tasks:
            x, y = self.client_data(task.client_id)
            results.append(algorithm.client_fit(task, model, x, y))
        algorithm.aggregate(rnd, results)
        return round_stats(rnd, tasks, results, time.perf_counter() - start)

    def run_client(
        self, fn: ClientStep, client_id: int, state: Any, *args: Any
    ) -> tuple[Any, Any]:
        """``fn(state, model, x, y, *args)`` here, on the client's examples; returns
        its ``(state, reply)`` (the state is the driver's own object)."""
        check_client(client_id, self.num_clients)
        x, y = self.client_data(client_id)
        return fn(state, self._scratch(), x, y, *args)

    def fetch(self, states: Sequence[Any]) -> list[Any]:
        """The states themselves: they never left this process."""
        return list(states)
