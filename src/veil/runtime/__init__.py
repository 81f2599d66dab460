"""Runtimes: where a client's work runs and how messages travel.

The simulation runtime runs clients as objects in one process; the Ray runtime runs
each client's local work as a Ray task (``pip install 'veil[ray]'``). Both implement
the same :class:`Runtime` protocol and give the same model for the same seed. The
network runtime (a server and device processes over HTTPS) is :mod:`veil.network`.
"""

from veil.runtime._base import (
    FederatedAlgorithm,
    RoundStats,
    Runtime,
    client_state_hooks,
)
from veil.runtime.ray_runtime import RayRuntime
from veil.runtime.simulation import SimulationRuntime

__all__ = [
    "FederatedAlgorithm",
    "RayRuntime",
    "RoundStats",
    "Runtime",
    "SimulationRuntime",
    "client_state_hooks",
]
