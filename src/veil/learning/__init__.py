"""Learning: local training, FedAvg and the baselines, as plain PyTorch with no I/O.

The server side of an algorithm chooses clients and aggregates their results; the
client side trains on local data. Which machine runs which side is the runtime's
business (:mod:`veil.runtime`).
"""

from veil.learning._types import ClientResult, ClientTask, StateDict
from veil.learning.dp_fedavg import DPFedAvg, RoundRecord
from veil.learning.encoding import encoded_size
from veil.learning.fedavg import FedAvg, check_update, weighted_average
from veil.learning.local import LocalTrainer, SGDTrainer, TrainStats, evaluate
from veil.learning.user_dp import (
    AdaptiveClipping,
    ClientSampling,
    NoisePlacement,
    NoisePlan,
    add_noise,
    clip_update,
    combined_noise_multiplier,
    update_noise_multiplier,
    update_norm,
)

__all__ = [
    "AdaptiveClipping",
    "ClientResult",
    "ClientSampling",
    "ClientTask",
    "DPFedAvg",
    "FedAvg",
    "LocalTrainer",
    "NoisePlacement",
    "NoisePlan",
    "RoundRecord",
    "SGDTrainer",
    "StateDict",
    "TrainStats",
    "add_noise",
    "check_update",
    "clip_update",
    "combined_noise_multiplier",
    "encoded_size",
    "evaluate",
    "update_noise_multiplier",
    "update_norm",
    "weighted_average",
]
