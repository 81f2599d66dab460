"""The runner's choice of runtime: where clients' work runs (``runtime`` key).

``simulation`` runs every client in this process; ``ray`` runs each client's local
work as a Ray task (``[ray]`` section); ``network`` runs a server on 127.0.0.1 and
device processes that reach it over HTTP (``[network]`` section). Methods ask
:func:`open_runtime` for a runtime and use it as a context manager, so a local Ray
(or a server and its devices) started for a method is stopped when the method ends,
even when it fails. The simulation and Ray runtimes run rounds (FedAvg and the
methods built on it) and turns (DSSGD); the network runtime runs rounds.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from veil.data import Dataset
from veil.experiment.config import ExperimentConfig
from veil.models import build_model
from veil.runtime import RayRuntime, SimulationRuntime

if TYPE_CHECKING:
    from veil.experiment._network import NetworkRuntime

__all__ = ["open_runtime"]


@contextmanager
def open_runtime(
    config: ExperimentConfig, train: Dataset, client_indices: Sequence[np.ndarray]
) -> Iterator[SimulationRuntime | RayRuntime | NetworkRuntime]:
    """The runtime ``config.runtime`` names, holding ``train`` split by
    ``client_indices``; closed on exit."""
    model_fn = functools.partial(build_model, config.model.name)
    if config.runtime == "simulation":
        yield SimulationRuntime(model_fn, train, client_indices)
        return
    if config.runtime == "network":
        from veil.experiment._network import NetworkRuntime

        network = NetworkRuntime(config, len(client_indices))
        try:
            yield network
        finally:
            network.shutdown()
        return
    r = config.ray
    memory = None if r.memory_per_client_mb is None else r.memory_per_client_mb << 20
    runtime = RayRuntime(
        model_fn,
        train,
        client_indices,
        address=r.address,
        num_cpus=r.num_cpus,
        cpus_per_client=r.cpus_per_client,
        memory_per_client=memory,
    )
    try:
        yield runtime
    finally:
        runtime.shutdown()
