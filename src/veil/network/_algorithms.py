"""What the server needs to know about each algorithm it can drive over the network.

The server drives the same algorithm objects as the simulation runtime; this module
holds the few things that differ between them: the method's name, what a checkpoint
must hold to resume (the global model, and for DP-FedAvg the server momentum,
clipping norm and round history), the privacy ledger, and the bound on an update's
L2 norm the server may enforce before accepting it.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

from veil.errors import ConfigError
from veil.learning import DPFedAvg, FedAvg
from veil.learning._types import StateDict
from veil.learning.dp_fedavg import UNCLIPPED
from veil.learning.user_dp import NoisePlacement
from veil.privacy import PrivacyEvent, PrivacyLedger
from veil.runtime import FederatedAlgorithm

__all__ = [
    "apply_checkpoint",
    "check_metrics",
    "checkpoint_of",
    "ledger_of",
    "method_of",
    "new_events",
    "norm_bound",
]

CHECKPOINT_FORMAT = "veil.network-checkpoint/1"
_GLOBAL = "global/"
_VELOCITY = "velocity/"


def method_of(algorithm: FederatedAlgorithm) -> str:
    """``"fedavg"`` or ``"dp-fedavg"``; other algorithms are refused."""
    if type(algorithm) is DPFedAvg:
        if algorithm.secure_noise:
            raise ConfigError(
                "dp_fedavg.secure_noise must be false for the network runtime "
                "(its client sample cannot be re-drawn after a restart), got true"
            )
        return "dp-fedavg"
    if type(algorithm) is FedAvg:
        if algorithm.trainer_for is not None or algorithm.client_states is not None:
            raise ConfigError(
                "fedavg.local_dp must be false for the network runtime (a client's "
                "DP-SGD ledger lives on the device and is not carried yet), got true"
            )
        return "fedavg"
    raise ConfigError(
        "the network runtime drives FedAvg and DP-FedAvg (without secure "
        f"aggregation), got {type(algorithm).__name__}"
    )


def ledger_of(algorithm: FederatedAlgorithm) -> PrivacyLedger | None:
    """The user-level privacy ledger the server keeps, if the algorithm has one."""
    return algorithm.ledger if isinstance(algorithm, DPFedAvg) else None


def norm_bound(algorithm: FederatedAlgorithm, configured: float | None) -> float:
    """The largest L2 norm of an update the server accepts.

    ``configured`` when given; for DP-FedAvg with central noise, else, the round's
    clipping norm (an honest client clips to it; 1e-4 relative slack for float32
    rounding); otherwise no bound (``inf``).
    """
    if configured is not None:
        return configured
    central = isinstance(algorithm, DPFedAvg) and (
        NoisePlacement(algorithm.placement) is NoisePlacement.CENTRAL
    )
    if central:
        assert isinstance(algorithm, DPFedAvg)
        return algorithm.clipping_norm * (1 + 1e-4)
    return math.inf


def check_metrics(algorithm: FederatedAlgorithm, metrics: dict[str, float]) -> str:
    """What is wrong with a result's metrics for ``algorithm``, or ``""``.

    DP-FedAvg with adaptive clipping needs the centred clipped-or-not indicator
    (``unclipped``); with central noise it must be -0.5 or 0.5, so one client moves
    the clipping norm's count by at most 1/2 (under distributed noise it carries the
    client's noise share and cannot be bounded).
    """
    if not isinstance(algorithm, DPFedAvg) or algorithm.adaptive is None:
        return ""
    value = metrics.get(UNCLIPPED)
    if value is None:
        return f"metrics must hold {UNCLIPPED!r} for adaptive clipping"
    central = NoisePlacement(algorithm.placement) is NoisePlacement.CENTRAL
    if central and value not in (-0.5, 0.5):
        return f"metrics[{UNCLIPPED!r}] must be -0.5 or 0.5, got {value}"
    return ""


def checkpoint_of(
    algorithm: FederatedAlgorithm, rnd: int
) -> tuple[StateDict, dict[str, str]]:
    """The tensors and string metadata that let a restarted server resume after
    round ``rnd``."""
    state: StateDict = getattr(algorithm, "global_state")  # noqa: B009
    tensors = {_GLOBAL + k: v for k, v in state.items()}
    metadata = {"format": CHECKPOINT_FORMAT, "round": str(rnd)}
    if isinstance(algorithm, DPFedAvg):
        velocity, values = algorithm.server_state()
        tensors.update({_VELOCITY + k: v for k, v in velocity.items()})
        metadata["server_state"] = json.dumps(values)
    return tensors, metadata


def apply_checkpoint(
    algorithm: FederatedAlgorithm, tensors: StateDict, metadata: dict[str, str]
) -> None:
    """Load a checkpoint of :func:`checkpoint_of` into ``algorithm``."""
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"checkpoint format must be {CHECKPOINT_FORMAT!r}, got "
            f"{metadata.get('format')!r}"
        )
    # Keep the model's own tensor order: seeded noise is drawn tensor by tensor.
    order = list(getattr(algorithm, "global_state"))  # noqa: B009
    setattr(algorithm, "global_state", _strip(tensors, _GLOBAL, order))  # noqa: B010
    if isinstance(algorithm, DPFedAvg):
        values: dict[str, Any] = json.loads(metadata["server_state"])
        velocity = _strip(tensors, _VELOCITY, order)
        algorithm.load_server_state(velocity, values)


def _strip(tensors: StateDict, prefix: str, order: list[str]) -> StateDict:
    return {k: tensors[prefix + k] for k in order if prefix + k in tensors}


def new_events(
    before: tuple[PrivacyEvent, ...], after: tuple[PrivacyEvent, ...]
) -> list[PrivacyEvent]:
    """The events recorded between two snapshots of a ledger's events (the ledger
    merges a repeated event into the last one's count, which this undoes)."""
    if not before:
        return list(after)
    k = len(before) - 1
    out = []
    grown = after[k].count - before[k].count
    if grown > 0:
        out.append(replace(after[k], count=grown))
    return out + list(after[k + 1 :])
