"""Learning: local training, FedAvg and the baselines, as plain PyTorch with no I/O.

The server side of an algorithm chooses clients and aggregates their results; the
client side trains on local data. Which machine runs which side is the runtime's
business (:mod:`veil.runtime`).
"""

from veil.learning._types import ClientResult, ClientTask, StateDict
from veil.learning.encoding import encoded_size
from veil.learning.fedavg import FedAvg, check_update, weighted_average
from veil.learning.local import LocalTrainer, SGDTrainer, TrainStats, evaluate

__all__ = [
    "ClientResult",
    "ClientTask",
    "FedAvg",
    "LocalTrainer",
    "SGDTrainer",
    "StateDict",
    "TrainStats",
    "check_update",
    "encoded_size",
    "evaluate",
    "weighted_average",
]
