"""The simulation runtime: exact byte counts and refusal of impossible clients."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import make_tiny
from veil.errors import DataError
from veil.learning import FedAvg, SGDTrainer, encoded_size
from veil.learning.encoding import encode
from veil.models import build_model
from veil.runtime import SimulationRuntime


def test_round_counts_bytes_exactly() -> None:
    data = make_tiny(n_train=100, n_test=10)
    parts = np.array_split(np.arange(100), 5)
    model = build_model("2nn")
    algorithm = FedAvg(model.state_dict(), 5, 0.4, SGDTrainer(0.1, 1, 10), seed=0)
    runtime = SimulationRuntime(lambda: build_model("2nn"), data.train, parts)
    before = dict(algorithm.global_state)
    stats = runtime.run_round(algorithm, 1)
    assert stats.clients == 2
    assert stats.bytes_down == 2 * len(encode(before))
    # An update has the model's names and shapes, so it encodes to the same size.
    assert stats.bytes_up == 2 * encoded_size(before)


def test_empty_client_is_refused_up_front() -> None:
    data = make_tiny(n_train=10, n_test=10)
    with pytest.raises(DataError, match=r"clients \[1\] have no examples"):
        SimulationRuntime(
            lambda: build_model("2nn"),
            data.train,
            [np.arange(10), np.array([], dtype=int)],
        )


def test_task_for_unknown_client_is_refused() -> None:
    data = make_tiny(n_train=20, n_test=10)
    algorithm = FedAvg(build_model("2nn").state_dict(), 5, 1.0, SGDTrainer(0.1))
    runtime = SimulationRuntime(
        lambda: build_model("2nn"), data.train, np.array_split(np.arange(20), 2)
    )
    with pytest.raises(DataError, match=r"client_id must be in \[0, 2\)"):
        runtime.run_round(algorithm, 1)
