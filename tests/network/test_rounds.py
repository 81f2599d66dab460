"""Rounds over HTTP: the same model as the simulation, deadlines, and a restart
that loses nothing accepted."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.network.conftest import (
    NUM_CLIENTS,
    Harness,
    tiny_fedavg,
    tiny_model_state,
    tiny_net,
    tiny_shards,
)
from veil.errors import RoundFailedError
from veil.learning import DPFedAvg, SGDTrainer
from veil.network import ServerSettings
from veil.privacy import PrivacyLedger
from veil.runtime import SimulationRuntime


def simulate(algorithm: object, rounds: int) -> None:
    data, shards = tiny_shards()
    runtime = SimulationRuntime(lambda: tiny_net(), data.train, shards)
    for rnd in range(1, rounds + 1):
        runtime.run_round(algorithm, rnd)  # type: ignore[arg-type]


def run_over_http(h: Harness, rounds: int) -> None:
    """Every picked client trains and uploads, in decreasing client order (the
    reverse of the simulation's)."""
    tokens = {k: h.enrol(k) for k in range(NUM_CLIENTS)}
    for rnd in range(1, rounds + 1):
        h.open_round(rnd)
        for k in sorted(tokens, reverse=True):
            task = h.task(tokens[k])
            if task is not None:
                r = h.upload_result(tokens[k], h.fit(task, tokens[k]))
                assert r.status_code == 201, r.text
        h.wait()
        assert h.error is None


def assert_same_model(a: object, b: object) -> None:
    sa, sb = a.global_state, b.global_state  # type: ignore[attr-defined]
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_fedavg_over_http_equals_simulation(tmp_path: Path) -> None:
    h = Harness(tmp_path, tiny_fedavg())
    run_over_http(h, rounds=2)
    reference = tiny_fedavg()
    simulate(reference, rounds=2)
    assert_same_model(h.algorithm, reference)
    assert h.server.status()["rounds_aggregated"] == 2


def tiny_dp_fedavg(sampling: str = "poisson") -> DPFedAvg:
    fixed = sampling == "fixed"
    return DPFedAvg(
        global_state=tiny_model_state(),
        num_clients=NUM_CLIENTS,
        sample_rate=0.5,
        clipping_norm=0.5,
        noise_multiplier=1.0,
        trainer=SGDTrainer(0.1, 1, 10),
        ledger=PrivacyLedger("rdp", "replace_one" if fixed else "add_or_remove_one"),
        sampling=sampling,
        seed=3,
    )


def test_dp_fedavg_over_http_equals_simulation_and_keeps_the_ledger(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, tiny_dp_fedavg())
    h.server.delta = 1e-3
    run_over_http(h, rounds=2)
    reference = tiny_dp_fedavg()
    simulate(reference, rounds=2)
    assert_same_model(h.algorithm, reference)
    assert h.algorithm.ledger.events == reference.ledger.events  # type: ignore[attr-defined]
    status = h.server.status()
    assert status["ledger_entries"] == 2
    assert status["epsilon"] == pytest.approx(reference.ledger.epsilon(1e-3))


def test_round_without_enough_results_fails_and_the_next_starts(
    tmp_path: Path,
) -> None:
    settings = ServerSettings(round_timeout=0.3, min_results=1)
    h = Harness(tmp_path, tiny_fedavg(), settings)
    before = copy.deepcopy(h.algorithm.global_state)  # type: ignore[attr-defined]
    h.open_round(1)
    h.wait()
    assert h.stats[0].clients == 0
    status = h.server.status()
    assert status["rounds_failed"] == 1
    assert h.store.rounds()[0].reason == "0 of 2 results by the deadline, 1 needed"
    assert_same_model(h.algorithm, type("S", (), {"global_state": before})())
    h.open_round(2)  # the next round opens
    h.server.finish()


def test_failed_round_can_stop_the_server(tmp_path: Path) -> None:
    settings = ServerSettings(round_timeout=0.2, on_failed_round="stop")
    h = Harness(tmp_path, tiny_fedavg(), settings)
    h.open_round(1)
    h.wait()
    assert isinstance(h.error, RoundFailedError)
    assert "0 of 2 results" in str(h.error)


def test_deadline_aggregates_what_arrived(tmp_path: Path) -> None:
    settings = ServerSettings(round_timeout=1.0, min_results=1)
    h = Harness(tmp_path, tiny_fedavg(), settings)
    tokens = {k: h.enrol(k) for k in range(NUM_CLIENTS)}
    h.open_round(1)
    k = next(k for k, t in tokens.items() if h.task(t) is not None)
    assert (
        h.upload_result(tokens[k], h.fit(h.task(tokens[k]), tokens[k])).status_code
        == 201
    )  # type: ignore[arg-type]
    h.wait()
    assert h.stats[0].clients == 1
    assert h.server.status()["rounds_aggregated"] == 1


def test_restart_keeps_accepted_updates_and_ledger(tmp_path: Path) -> None:
    """A server dropped mid-round (no clean shutdown) and started again on the same
    folder resumes the open round with the update it had accepted, and ends with
    the simulation's model."""
    first = Harness(tmp_path, tiny_dp_fedavg("fixed"))
    tokens = {k: first.enrol(k) for k in range(NUM_CLIENTS)}
    first.open_round(1)
    picked = [k for k in tokens if first.task(tokens[k]) is not None]
    for k in picked:
        first.upload_result(tokens[k], first.fit(first.task(tokens[k]), tokens[k]))  # type: ignore[arg-type]
    first.wait()
    first.open_round(2)
    picked = [k for k in tokens if first.task(tokens[k]) is not None]
    r = first.upload_result(
        tokens[picked[0]], first.fit(first.task(tokens[picked[0]]), tokens[picked[0]])
    )  # type: ignore[arg-type]
    assert r.status_code == 201
    # The process "dies" here: its round loop stops without touching the state,
    # and a new server starts on the same folder.
    first.server.finish()
    second = Harness(tmp_path, tiny_dp_fedavg("fixed"))
    assert second.server.next_round == 2
    assert len(second.algorithm.ledger.events) == 1  # type: ignore[attr-defined]
    second.open_round(2)
    assert second.task(tokens[picked[0]]) is None  # already accepted
    for k in picked[1:]:
        second.upload_result(tokens[k], second.fit(second.task(tokens[k]), tokens[k]))  # type: ignore[arg-type]
    second.wait()
    reference = tiny_dp_fedavg("fixed")
    simulate(reference, rounds=2)
    assert_same_model(second.algorithm, reference)
    assert second.server.status()["ledger_entries"] == 2
