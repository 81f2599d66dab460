"""Runtimes: where a client's work runs and how messages travel.

Only the simulation runtime (clients as objects in one process) exists so far; the
Ray and network runtimes implement the same :class:`Runtime` protocol.
"""

from veil.runtime._base import FederatedAlgorithm, RoundStats, Runtime
from veil.runtime.simulation import SimulationRuntime

__all__ = ["FederatedAlgorithm", "RoundStats", "Runtime", "SimulationRuntime"]
