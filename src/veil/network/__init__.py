"""The network runtime: one federated server and many device processes over HTTP(S).

- :class:`FederatedServer` (:mod:`veil.network.server`) drives FedAvg or DP-FedAvg
  rounds with devices it has enrolled, keeping its state in a :class:`StateStore`
  (SQLite and atomic checkpoints), so a killed server resumes where it was;
- :class:`SecureFederatedServer` (:mod:`veil.network.secagg`) runs each round's
  aggregation as secure aggregation steps (devices: :mod:`veil.network.secagg_device`);
- :func:`create_app` (:mod:`veil.network.app`) is its FastAPI app;
- :mod:`veil.network.device` is the device process (``veil join``);
- :mod:`veil.network.certs` writes a self-signed certificate for trials
  (``veil certs``).

See docs/network.md for the protocol, the trust model and the limits.
"""

from veil.network.app import create_app
from veil.network.secagg import SecureFederatedServer
from veil.network.server import FederatedServer, ServerSettings
from veil.network.store import StateStore

__all__ = [
    "FederatedServer",
    "SecureFederatedServer",
    "ServerSettings",
    "StateStore",
    "create_app",
]
