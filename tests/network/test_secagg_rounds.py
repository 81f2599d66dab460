"""Secure aggregation rounds over HTTP: the simulation's model, what the server
sees, dropouts at each step, too many dropouts, and a restart mid-protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load
from scipy import stats

from tests.network.secagg_harness import (
    CLIENTS,
    SecureHarness,
    secure_dp_fedavg,
    secure_fedavg,
    simulate,
)
from veil.errors import ConfigError
from veil.learning import FedAvg, SGDTrainer
from veil.network import FederatedServer, StateStore
from veil.network.secagg import SecureFederatedServer
from veil.network.secagg_device import SecureSession
from veil.secagg import Step
from veil.secagg.messages import MaskedInput, decode


def assert_same_model(a: Any, b: Any) -> None:
    assert a.global_state.keys() == b.global_state.keys()
    for name in a.global_state:
        assert torch.equal(a.global_state[name], b.global_state[name]), name


def fixed_dropouts(algorithm: Any, plan: dict[Step, list[int]]) -> Any:
    """The simulation's dropouts replaced by ``plan`` (client ids by the step they
    drop out before), the same in every round."""
    algorithm._dropouts = lambda rnd, clients: {s: list(plan.get(s, [])) for s in Step}
    return algorithm


def test_secure_fedavg_over_http_equals_simulation(tmp_path: Path) -> None:
    h = SecureHarness(tmp_path, secure_fedavg())
    h.run(rounds=2)
    assert h.error is None
    reference = secure_fedavg()
    simulate(reference, rounds=2)
    assert_same_model(h.algorithm, reference)
    status = h.server.status()
    assert status["rounds_aggregated"] == 2 and status["updates_accepted"] == 0
    assert reference.last_included == h.algorithm.last_included == tuple(range(CLIENTS))
    # every protocol byte is counted: about one plain update per client, and more
    metrics = h.algorithm.take_metrics()
    assert 1.0 < metrics["secagg_expansion"] < 1.3, metrics


def test_secagg_plus_over_http_equals_simulation(tmp_path: Path) -> None:
    """SecAgg+ (k = 2): the server picks a fresh graph seed; the sum, and so the
    model, does not depend on it."""
    h = SecureHarness(tmp_path, secure_fedavg(neighbours=4, threshold=0.6))
    h.run(rounds=1)
    assert h.error is None
    reference = secure_fedavg(neighbours=4, threshold=0.6)
    simulate(reference, rounds=1)
    assert_same_model(h.algorithm, reference)


def test_secure_dp_fedavg_over_http_equals_simulation_and_ledger(
    tmp_path: Path,
) -> None:
    h = SecureHarness(tmp_path, secure_dp_fedavg())
    h.run(rounds=2)
    assert h.error is None
    reference = secure_dp_fedavg()
    simulate(reference, rounds=2)
    assert_same_model(h.algorithm, reference)
    assert h.algorithm.ledger.events == reference.ledger.events
    assert h.server.status()["ledger_entries"] == 2


def test_server_sees_masked_vectors_and_unmasks_the_exact_sum(tmp_path: Path) -> None:
    h = SecureHarness(tmp_path, secure_fedavg())
    h.run(rounds=1)
    assert h.error is None
    inputs = {k: v for (rnd, k), v in h.recorder.inputs.items() if rnd == 1}
    bits = h.algorithm.secagg.bits

    # what crossed the wire for each client: the masked vector, not its input
    masked = {
        k: load(body)["masked_input"]
        for path, k, body in h.sent
        if path.endswith("/masked-input")
    }
    assert sorted(masked) == sorted(inputs) == list(range(CLIENTS))
    for k, y in masked.items():
        x = inputs[k]
        assert y.dtype == x.dtype and y.shape == x.shape
        # uniform over [0, 2**bits): chi-square over 16 equal bins of the top bits
        counts = np.bincount((y >> np.uint32(bits - 4)).astype(np.int64), minlength=16)
        assert stats.chisquare(counts).pvalue > 1e-4, k
        # and uncorrelated with the client's encoded input
        r = np.corrcoef(y.astype(np.float64), x.astype(np.float64))[0, 1]
        assert abs(r) < 5 / np.sqrt(len(x)), (k, r)
        assert not np.array_equal(y, x)

    # the unmasked result is the exact sum of the included inputs modulo 2**bits
    total, included = h.recorder.sums[1]
    expected = sum(inputs[k].astype(object) for k in included) % 2**bits
    assert included == tuple(range(CLIENTS))
    assert np.array_equal(total.astype(object), expected)


def test_dropouts_after_share_keys_and_after_masked_input(tmp_path: Path) -> None:
    """Client 1 stops after sharing keys (no masked input), client 4 after its
    masked input (no unmasking): the sum holds every input but client 1's, and
    the model is the simulation's with the same dropouts."""
    h = SecureHarness(tmp_path, secure_fedavg(), step_timeout=2.0)
    h.run(rounds=1, stop_after={1: Step.SHARE_KEYS, 4: Step.MASKED_INPUT})
    assert h.error is None
    total, included = h.recorder.sums[1]
    assert included == (0, 2, 3, 4, 5)
    inputs = {k: v for (_, k), v in h.recorder.inputs.items()}
    expected = sum(inputs[k].astype(object) for k in included) % 2**32
    assert np.array_equal(total.astype(object), expected)
    reference = fixed_dropouts(
        secure_fedavg(), {Step.MASKED_INPUT: [1], Step.UNMASKING: [4]}
    )
    simulate(reference, rounds=1)
    assert_same_model(h.algorithm, reference)


def test_too_many_dropouts_fail_the_round_and_the_next_runs(tmp_path: Path) -> None:
    """Three of six stop after sharing keys: three masked inputs are fewer than
    t = 4, so round 1 fails with the reason and round 2 still runs (and fails the
    same way, as the same clients drop again)."""
    algorithm = secure_fedavg()
    before = {k: v.clone() for k, v in algorithm.global_state.items()}
    h = SecureHarness(tmp_path, algorithm, step_timeout=2.0)
    stop = dict.fromkeys((0, 2, 5), Step.SHARE_KEYS)
    h.run(rounds=2, stop_after=stop)
    assert h.error is None
    rows = h.store.rounds()
    assert [r.status for r in rows] == ["failed", "failed"]
    assert "secure aggregation aborted" in (rows[0].reason or "")
    assert "fewer than the threshold 4" in (rows[0].reason or "")
    assert all(torch.equal(before[k], v) for k, v in algorithm.global_state.items())
    assert algorithm.take_metrics()["secagg_aborted"] == 2


def test_a_refused_round_can_stop_the_server(tmp_path: Path) -> None:
    h = SecureHarness(
        tmp_path, secure_fedavg(), step_timeout=2.0, on_failed_round="stop"
    )
    h.run(rounds=2, stop_after=dict.fromkeys((0, 2, 5), Step.SHARE_KEYS))
    assert h.error is not None and "secure aggregation aborted" in str(h.error)
    assert [r.status for r in h.store.rounds()] == ["failed"]


def test_restart_mid_protocol_fails_that_round_and_runs_the_next(
    tmp_path: Path,
) -> None:
    """A server stopped after the masked input step (its protocol state lost)
    restarts on the same folder: the round is failed with the reason, the next
    round runs, and its model is the simulation's round 1 model on round 2."""
    first = SecureHarness(tmp_path, secure_fedavg(), step_timeout=2.0)
    first.enrol_all()
    closed = first.server._next_step

    def stop_before_unmasking(sec: Any, step: Step, finish: Any) -> None:
        closed(sec, step, finish)
        if step is Step.UNMASKING:
            first.server.finish()  # as if killed: the round is still open on disk

    first.server._next_step = stop_before_unmasking  # type: ignore[method-assign]
    first.run(rounds=1)
    assert [r.status for r in first.store.rounds()] == ["open"]
    first.store.close()

    second = SecureHarness(tmp_path, secure_fedavg())
    second.tokens = first.tokens
    rows = second.store.rounds()
    assert rows[0].status == "failed" and "restarted" in (rows[0].reason or "")
    assert second.server.next_round == 2
    second.run(rounds=2)
    assert second.error is None
    assert [r.status for r in second.store.rounds()] == ["failed", "aggregated"]


def test_plain_algorithms_and_secure_noise_are_refused(tmp_path: Path) -> None:
    plain = FedAvg(
        secure_fedavg().global_state, CLIENTS, 1.0, SGDTrainer(0.1, 1, 10), 0
    )
    with pytest.raises(ConfigError, match="needs a secure algorithm"):
        SecureFederatedServer(plain, StateStore(tmp_path / "a"), CLIENTS)
    with pytest.raises(ConfigError, match="without secure aggregation"):
        FederatedServer(secure_fedavg(), StateStore(tmp_path / "b"), CLIENTS)
    noisy = tiny_dp_fedavg_plain()
    noisy.secure_noise = True
    with pytest.raises(ConfigError, match="secure_noise must be false"):
        FederatedServer(noisy, StateStore(tmp_path / "c"), CLIENTS)


def test_secure_noise_runs_under_secure_aggregation(tmp_path: Path) -> None:
    """With secure aggregation no round is resumed after a restart, so noise and
    Poisson sampling from os.urandom are allowed: the rounds aggregate and the
    ledger records them (the model is not reproducible, by design)."""
    algorithm = secure_dp_fedavg()
    algorithm.secure_noise = True
    h = SecureHarness(tmp_path, algorithm)
    h.run(rounds=1)
    assert h.error is None
    assert [r.status for r in h.store.rounds()] == ["aggregated"]
    assert h.server.status()["ledger_entries"] == 1
    reference = secure_dp_fedavg()
    simulate(reference, rounds=1)
    assert any(
        not torch.equal(algorithm.global_state[k], reference.global_state[k])
        for k in reference.global_state
    )  # fresh noise: not the seeded simulation's model


def tiny_dp_fedavg_plain() -> Any:
    from tests.network.test_rounds import tiny_dp_fedavg

    return tiny_dp_fedavg()


def test_session_refuses_an_unexpected_first_message() -> None:
    session = SecureSession(secure_fedavg(), None, None, None)  # type: ignore[arg-type]
    masked = MaskedInput(1, 0, (), 8, np.zeros(3, np.uint8)).encode()
    assert isinstance(decode(masked), MaskedInput)
    with pytest.raises(Exception, match="round config"):
        session._answer(Step.ADVERTISE_KEYS, masked)


def test_device_built_from_the_served_config_encodes_as_the_server_decodes() -> None:
    """DP-FedAvg without ``secagg.clip_range``: the server's range is S + 6 s per
    round; a device built from the served config gets it from its task, so its
    encoded input is the one the simulation encodes."""
    import tomllib

    from veil.experiment._network import _build, server_side
    from veil.experiment.config import parse_config
    from veil.learning import ClientResult
    from veil.learning.dp_fedavg import UNCLIPPED

    text = """
    methods = ["dp-fedavg"]
    [data]
    dataset = "tuandromd"
    num_clients = 10
    [model]
    name = "tuandromd-mlp"
    [dp_fedavg]
    sampling = "fixed"
    sample_rate = 0.5
    clipping_norm = 0.5
    noise_multiplier = 1.0
    accountant = "rdp"
    placement = "distributed"
    adaptive_clipping = true
    secure_aggregation = true
    """
    server, served, _ = server_side(parse_config(tomllib.loads(text)), "dp-fedavg")
    device, _ = _build(parse_config(served), "dp-fedavg", server.global_state)
    tasks = server.configure_round(1)
    g = torch.Generator().manual_seed(0)
    update = {
        k: 0.1 * torch.randn(v.shape, generator=g)
        for k, v in server.global_state.items()
    }
    result = ClientResult(tasks[0].client_id, 1, update, 10, 0.0, {UNCLIPPED: 0.3})
    on_device = device.secure_input(tasks[0], result, len(tasks))
    expected = server.encoder(len(tasks)).encode(server.client_values(1, result))
    assert server.clip_range is None and server.ranges(1)[0] != 1.0
    assert np.array_equal(on_device, expected)
