"""Runtimes: where a client's work runs and how messages travel.

The simulation runtime runs clients as objects in one process; the Ray runtime runs
each client's local work as a Ray task (``pip install 'veil[ray]'``). Both implement
the same :class:`Runtime` protocol (rounds) and :class:`TurnRuntime` protocol (one
client's turn at a time, for DSSGD) and give the same model for the same seed. The
network runtime (a server and device processes over HTTPS) is :mod:`veil.network`.
"""

from veil.runtime._base import (
    ClientStep,
    FederatedAlgorithm,
    RoundStats,
    Runtime,
    TurnRuntime,
    client_state_hooks,
)
from veil.runtime.ray_runtime import RayRuntime
from veil.runtime.simulation import SimulationRuntime

__all__ = [
    "ClientStep",
    "FederatedAlgorithm",
    "RayRuntime",
    "RoundStats",
    "Runtime",
    "SimulationRuntime",
    "TurnRuntime",
    "client_state_hooks",
]
