"""Distributed selective SGD: equivalence with sequential SGD, selection, the server
under concurrency, sparse encoding, and the sparse vector technique."""

from __future__ import annotations

import copy
import json
import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from veil.errors import ConfigError, UpdateError
from veil.learning import SGDTrainer
from veil.learning.dssgd import (
    Download,
    DSSGDClient,
    DSSGDSettings,
    GeneratorLaplace,
    ParameterServer,
    SecureLaplace,
    SelectiveDP,
    SparseVector,
    Upload,
    decode_sparse,
    encode_sparse,
    flatten,
    select_above_threshold,
    select_largest,
    sparse_vector_technique,
    turn_order,
    turn_seed,
    unflatten,
    upload_count,
    upload_events,
)
from veil.privacy import PrivacyBudget, PrivacyLedger


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def client_data(k: int, n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)


def turn(
    server: ParameterServer,
    client: DSSGDClient,
    model: nn.Module,
    trainer: SGDTrainer,
    settings_: DSSGDSettings,
    seed: int,
) -> int:
    generator = torch.Generator().manual_seed(seed)
    download = server.download(client.client_id, settings_.download_fraction, generator)
    x, y = client_data(client.client_id)
    upload = client.turn(download, model, x, y, trainer, generator, settings_)
    return server.apply(upload)


# --------------------------------------------------------------------------------
# DSSGD with θu = θd = 1 is sequential SGD
# --------------------------------------------------------------------------------


def test_full_sharing_round_robin_equals_sequential_sgd() -> None:
    num_clients, rounds, seed = 4, 3, 7
    model = small_model()
    initial = copy.deepcopy(model.state_dict())
    trainer = SGDTrainer(lr=0.1, epochs=1, batch_size=5, max_steps=1)
    full = DSSGDSettings(upload_fraction=1.0, download_fraction=1.0)

    server = ParameterServer(flatten(initial), num_clients)
    clients = [DSSGDClient(k, flatten(initial)) for k in range(num_clients)]
    scratch = small_model()
    for rnd in range(1, rounds + 1):
        for k in turn_order("round_robin", num_clients, rnd, seed):
            turn(server, clients[k], scratch, trainer, full, turn_seed(seed, rnd, k))

    # Independently: one SGD step per client, in client order, on one model.
    reference = small_model()
    reference.load_state_dict(initial)
    for rnd in range(1, rounds + 1):
        for k in range(num_clients):
            generator = torch.Generator().manual_seed(turn_seed(seed, rnd, k))
            trainer.train(reference, *client_data(k), generator)

    expected = flatten(reference.state_dict())
    torch.testing.assert_close(server.parameters(), expected, rtol=0, atol=1e-6)
    assert server.version == num_clients * rounds
    assert not torch.equal(expected, flatten(initial))  # training did move


# --------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 3000),
    fraction=st.floats(1e-4, 1.0),
    seed=st.integers(0, 2**16),
)
def test_largest_selection_picks_exactly_ceil_fraction(
    size: int, fraction: float, seed: int
) -> None:
    delta = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    count = upload_count(fraction, size)
    assert count == max(1, math.ceil(round(fraction * size, 9)))
    idx = select_largest(delta, count)
    assert idx.numel() == count == len(set(idx.tolist()))
    assert bool((idx[1:] > idx[:-1]).all())
    rest = torch.ones(size, dtype=torch.bool)
    rest[idx] = False
    if rest.any():
        assert delta[idx].abs().min() >= delta[rest].abs().max()


def test_upload_count_of_round_fractions() -> None:
    assert upload_count(0.1, 199_210) == 19_921
    assert upload_count(0.01, 199_210) == 1_993  # ceil(1992.1)
    assert upload_count(1.0, 10) == 10
    with pytest.raises(ConfigError, match="fraction must be in"):
        upload_count(0.0, 10)


def test_client_upload_has_exactly_ceil_fraction_parameters() -> None:
    client = DSSGDClient(0, torch.zeros(1001))
    delta = torch.randn(1001, generator=torch.Generator().manual_seed(1))
    for fraction in (1.0, 0.1, 0.01, 0.003):
        upload = client.make_upload(
            delta, DSSGDSettings(fraction), torch.Generator(), 0
        )
        assert upload.vector.count == math.ceil(round(fraction * 1001, 9))


def test_threshold_selection_is_random_among_those_above() -> None:
    delta = torch.tensor([0.5, -0.01, 0.3, 0.02, -0.4, 0.0])
    g = torch.Generator().manual_seed(0)
    assert select_above_threshold(delta, 10, 0.1, g).tolist() == [0, 2, 4]
    seen = {tuple(select_above_threshold(delta, 2, 0.1, g).tolist()) for _ in range(60)}
    assert seen == {(0, 2), (0, 4), (2, 4)}


def test_bound_truncates_uploaded_values() -> None:
    client = DSSGDClient(0, torch.zeros(4))
    delta = torch.tensor([3.0, -2.0, 0.5, -0.1])
    upload = client.make_upload(
        delta, DSSGDSettings(1.0, bound=1.0), torch.Generator(), 0
    )
    assert upload.vector.values.tolist() == [1.0, -1.0, 0.5, pytest.approx(-0.1)]


def test_residual_uploads_everything_eventually_and_loses_nothing() -> None:
    # Error feedback: what a turn does not upload (unselected or truncated by γ)
    # is carried into the next turn, so uploads plus the residual always add up to
    # every change the client made.
    client = DSSGDClient(0, torch.zeros(50))
    settings_ = DSSGDSettings(0.1, bound=0.5, residual=True)
    g = torch.Generator().manual_seed(3)
    made = torch.zeros(50)
    sent = torch.zeros(50)
    for _ in range(8):
        delta = torch.randn(50, generator=g)
        made += delta
        upload = client.make_upload(delta, settings_, g, 0)
        assert upload.vector.count == 5
        assert upload.vector.values.abs().max() <= 0.5
        sent[upload.vector.positions()] += upload.vector.values
        assert client.residual is not None
        torch.testing.assert_close(sent + client.residual, made)


def test_residual_changes_nothing_when_everything_is_uploaded() -> None:
    delta = torch.randn(30, generator=torch.Generator().manual_seed(4))
    plain = DSSGDClient(0, torch.zeros(30)).make_upload(
        delta, DSSGDSettings(1.0), torch.Generator(), 0
    )
    ef = DSSGDClient(0, torch.zeros(30))
    upload = ef.make_upload(
        delta, DSSGDSettings(1.0, residual=True), torch.Generator(), 0
    )
    assert torch.equal(upload.vector.values, plain.vector.values)
    assert ef.residual is not None and not ef.residual.any()


def test_residual_is_refused_with_dp() -> None:
    dp = SelectiveDP(epsilon_per_parameter=1.0, bound=0.1, threshold=0.01)
    with pytest.raises(ConfigError, match="residual must be false with dp"):
        DSSGDSettings(0.1, selection="threshold", bound=0.1, dp=dp, residual=True)


def test_settings_refuse_largest_with_dp() -> None:
    with pytest.raises(ConfigError, match="not differentially private"):
        DSSGDSettings(0.1, dp=SelectiveDP(1.0, 0.01))


# --------------------------------------------------------------------------------
# Downloads: the parameters updated most since the client's last download
# --------------------------------------------------------------------------------


def test_download_picks_the_most_updated_since_last_download() -> None:
    server = ParameterServer(torch.zeros(10), num_clients=2)
    g = torch.Generator().manual_seed(0)
    for idx, times in (([2, 5], 3), ([7], 2), ([1], 1)):
        for _ in range(times):
            vector = SparseVector(10, torch.tensor(idx), torch.ones(len(idx)))
            server.apply(Upload(1, vector, server.version))
    first = server.download(0, 0.3, g)  # 3 of 10
    assert first.vector.positions().tolist() == [2, 5, 7]
    assert first.vector.values.tolist() == [3.0, 3.0, 2.0]
    second = server.download(0, 0.1, g)  # nothing new on 2, 5, 7: then 1
    assert second.vector.positions().tolist() == [1]
    assert server.download(1, 1.0, g).vector.indices is None  # dense


def test_client_keeps_local_values_it_did_not_download() -> None:
    client = DSSGDClient(0, torch.arange(5, dtype=torch.float32))
    vector = SparseVector(5, torch.tensor([1, 3]), torch.tensor([10.0, 30.0]))
    client.receive(Download(0, vector, 0))
    assert client.parameters.tolist() == [0.0, 10.0, 2.0, 30.0, 4.0]


# --------------------------------------------------------------------------------
# The server under concurrency, and its refusals
# --------------------------------------------------------------------------------


def test_concurrent_uploads_are_all_applied() -> None:
    size, threads, per_thread = 500, 8, 60
    server = ParameterServer(torch.zeros(size), num_clients=threads)
    expected = torch.zeros(size, dtype=torch.float64)
    expected_counts = torch.zeros(size, dtype=torch.int64)
    plans = []
    for k in range(threads):
        g = torch.Generator().manual_seed(k)
        plan = []
        for _ in range(per_thread):
            idx = torch.randperm(size, generator=g)[:50].sort().values
            values = torch.randn(50, generator=g)
            plan.append((idx, values))
            expected[idx] += values.double()
            expected_counts[idx] += 1
        plans.append(plan)

    def worker(k: int) -> None:
        for idx, values in plans[k]:
            base = server.download(k, 1.0, torch.Generator()).version
            server.apply(Upload(k, SparseVector(size, idx, values), base))

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert server.version == threads * per_thread
    assert torch.equal(server.counts(), expected_counts)
    torch.testing.assert_close(
        server.parameters().double(), expected, atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    ("vector", "base", "client", "match"),
    [
        (SparseVector(9, None, torch.zeros(9)), 0, 0, "over 10 parameters"),
        (SparseVector(10, torch.tensor([3, 10]), torch.zeros(2)), 0, 0, r"\[0, 10\)"),
        (SparseVector(10, torch.tensor([4, 3]), torch.zeros(2)), 0, 0, "increasing"),
        (SparseVector(10, torch.tensor([3, 3]), torch.zeros(2)), 0, 0, "increasing"),
        (SparseVector(10, torch.tensor([1]), torch.tensor([math.nan])), 0, 0, "NaN"),
        (SparseVector(10, torch.tensor([1]), torch.zeros(2)), 0, 0, "one index"),
        (SparseVector(10, None, torch.zeros(10)), 5, 0, "base_version"),
        (SparseVector(10, None, torch.zeros(10)), 0, 3, "client_id"),
    ],
)
def test_server_refuses_bad_uploads_and_stays_unchanged(
    vector: SparseVector, base: int, client: int, match: str
) -> None:
    server = ParameterServer(torch.ones(10), num_clients=2)
    with pytest.raises(UpdateError, match=match):
        server.apply(Upload(client, vector, base))
    assert torch.equal(server.parameters(), torch.ones(10))
    assert server.version == 0 and int(server.counts().sum()) == 0


# --------------------------------------------------------------------------------
# Sparse encoding
# --------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 5000), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_sparse_encoding_round_trips_with_exact_byte_count(
    size: int, fraction: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    k = int(fraction * size)
    idx = torch.randperm(size, generator=g)[:k].sort().values
    dense = k == size
    vector = SparseVector(size, None if dense else idx, torch.randn(k, generator=g))
    payload = encode_sparse(vector)
    back = decode_sparse(payload)
    assert back.size == size
    assert torch.equal(back.values, vector.values)
    assert torch.equal(back.positions(), vector.positions())
    # safetensors: 8-byte header length, the JSON header, then raw tensor bytes
    # (4 per float32 value, 4 per int32 index) and nothing else.
    header_len = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + header_len])
    assert header["__metadata__"] == {"format": "veil.sparse/1", "size": str(size)}
    assert len(payload) == 8 + header_len + 4 * k + (0 if dense else 4 * k)


def test_one_percent_upload_is_at_most_2_5_percent_of_a_dense_upload() -> None:
    from veil.learning import encoded_size
    from veil.models import build_model

    state = build_model("2nn").state_dict()
    size = flatten(state).numel()
    delta = torch.randn(size, generator=torch.Generator().manual_seed(0))
    client = DSSGDClient(0, torch.zeros(size))
    upload = client.make_upload(delta, DSSGDSettings(0.01), torch.Generator(), 0)
    ratio = len(encode_sparse(upload.vector)) / encoded_size(state)
    assert ratio <= 0.025, ratio


def test_decode_refuses_other_payloads() -> None:
    with pytest.raises(UpdateError, match="not an encoded sparse vector"):
        decode_sparse(b"\x00" * 20)
    from safetensors.torch import save

    with pytest.raises(UpdateError, match="must be a"):
        decode_sparse(save({"values": torch.zeros(3)}, metadata={"size": "3"}))


def test_flatten_round_trips() -> None:
    state = small_model().state_dict()
    back = unflatten(flatten(state), state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(UpdateError, match="must hold"):
        unflatten(torch.zeros(3), state)


# --------------------------------------------------------------------------------
# Laplace noise and the sparse vector technique
# --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source", [GeneratorLaplace(torch.Generator().manual_seed(0)), SecureLaplace()]
)
@pytest.mark.filterwarnings("ignore::veil.privacy.InsecureNoiseWarning")
def test_laplace_noise_has_the_laplace_distribution(
    source: GeneratorLaplace | SecureLaplace,
) -> None:
    scale, n = 2.5, 200_000
    x = np.sort(source.laplace(n, scale).numpy())
    cdf = np.where(x < 0, 0.5 * np.exp(x / scale), 1 - 0.5 * np.exp(-x / scale))
    ks = np.max(np.abs(cdf - np.arange(1, n + 1) / n))
    assert ks < 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov at the 1% level
    assert abs(np.mean(np.abs(x)) - scale) < 0.02 * scale


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 400),
    count=st.integers(1, 50),
    threshold=st.floats(-2.0, 2.0),
    seed=st.integers(0, 999),
)
@pytest.mark.filterwarnings("ignore::veil.privacy.InsecureNoiseWarning")
def test_sparse_vector_answers_at_most_count_positively(
    size: int, count: int, threshold: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    queries = torch.rand(size, generator=g, dtype=torch.float64)
    order = torch.randperm(size, generator=g)
    idx, asked = sparse_vector_technique(
        queries, threshold, count, 0.1, 0.5, GeneratorLaplace(g), order
    )
    assert idx.numel() <= count
    assert 1 <= asked <= size
    if idx.numel() == count:  # halted at the count-th positive answer
        last = int(torch.nonzero(torch.isin(order, idx)).max())
        assert asked == last + 1
    else:
        assert asked == size


def _svt_outputs(queries: torch.Tensor, scales: tuple[float, float], n: int) -> dict:
    noise = GeneratorLaplace(torch.Generator().manual_seed(int(queries.sum() * 1e3)))
    order = torch.arange(queries.numel())
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(n):
        idx, _ = sparse_vector_technique(queries, 0.5, 1, *scales, noise, order)
        key = tuple(idx.tolist())
        counts[key] = counts.get(key, 0) + 1
    return counts


def _largest_log_ratio(a: dict, b: dict, n: int, floor: int) -> float:
    worst = 0.0
    for key in set(a) | set(b):
        pa, pb = a.get(key, 0), b.get(key, 0)
        if min(pa, pb) >= floor:  # well-estimated outputs only
            worst = max(worst, abs(math.log(pa / pb)))
    return worst


@pytest.mark.filterwarnings("ignore::veil.privacy.InsecureNoiseWarning")
def test_sparse_vector_selection_is_epsilon_dp_statistically() -> None:
    # Neighbouring query vectors: every query moves by the full sensitivity 1.
    d, d_prime = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])
    dp = SelectiveDP(epsilon_per_parameter=1.0, bound=1.0, selection_share=0.5)
    eps_threshold, eps_queries, _ = dp.epsilons(1)
    threshold_scale, query_scale, _ = dp.scales(1)
    n = 5_000
    a = _svt_outputs(d, (threshold_scale, query_scale), n)
    b = _svt_outputs(d_prime, (threshold_scale, query_scale), n)
    observed = _largest_log_ratio(a, b, n, floor=200)
    assert observed <= eps_threshold + eps_queries + 0.15, observed

    # The same audit has the power to see a mechanism with far less noise.
    loud = _svt_outputs(d, (threshold_scale / 20, query_scale / 20), n)
    loud_prime = _svt_outputs(d_prime, (threshold_scale / 20, query_scale / 20), n)
    assert _largest_log_ratio(loud, loud_prime, n, floor=30) > 1.5


def test_dp_scales_spend_exactly_the_upload_budget() -> None:
    dp = SelectiveDP(epsilon_per_parameter=0.5, bound=0.01)
    capacity = 200
    eps_t, eps_q, eps_v = dp.epsilons(capacity)
    assert eps_t + eps_q + eps_v == pytest.approx(capacity * 0.5)
    assert (eps_t + eps_q) / (capacity * 0.5) == pytest.approx(8 / 9)
    assert eps_q / eps_t == pytest.approx((2 * capacity) ** (2 / 3))
    t, q, v = dp.scales(capacity)
    assert t == pytest.approx(0.01 / eps_t)  # sensitivity γ of |clip(Δw)|
    assert q == pytest.approx(2 * capacity * 0.01 / eps_q)
    assert v == pytest.approx(capacity * 2 * 0.01 / eps_v)  # sensitivity 2γ


def test_dominating_laplace_dominates_every_pure_dp_mechanism() -> None:
    from dp_accounting.pld import common
    from dp_accounting.pld import privacy_loss_distribution as pld

    from veil.learning.dssgd import dominating_laplace_epsilon

    for eps in (0.05, 0.5, 2.0):
        worst = pld.from_privacy_parameters(
            common.DifferentialPrivacyParameters(eps, 0.0)
        )
        laplace = pld.from_laplace_mechanism(1 / dominating_laplace_epsilon(eps))
        naive = pld.from_laplace_mechanism(1 / eps)
        for e in np.linspace(0, eps, 9):
            assert laplace.get_delta_for_epsilon(e) >= worst.get_delta_for_epsilon(e)
        # Recording the selection as a Laplace mechanism of its own ε would
        # understate it: the point of the dominating one.
        assert naive.get_delta_for_epsilon(0) < worst.get_delta_for_epsilon(0)
        composed = worst.self_compose(8).get_epsilon_for_delta(1e-5)
        assert laplace.self_compose(8).get_epsilon_for_delta(1e-5) >= composed


@pytest.mark.filterwarnings("ignore::veil.privacy.InsecureNoiseWarning")
def test_dp_upload_records_its_events_and_obeys_the_budget() -> None:
    size, fraction = 400, 0.05
    capacity = upload_count(fraction, size)
    dp = SelectiveDP(epsilon_per_parameter=0.01, bound=0.1, threshold=0.0)
    settings_ = DSSGDSettings(fraction, selection="threshold", bound=0.1, dp=dp)
    ledger = PrivacyLedger("rdp")
    client = DSSGDClient(0, torch.zeros(size), ledger)
    delta = torch.randn(size, generator=torch.Generator().manual_seed(0))
    upload = client.make_upload(delta, settings_, torch.Generator().manual_seed(1), 0)

    assert 0 < upload.vector.count <= capacity
    assert upload.vector.values.abs().max() <= 0.1
    assert list(ledger.events) == upload_events(dp, capacity, upload.vector.count)
    eps_t, eps_q, eps_v = dp.epsilons(capacity)
    expected_pure = eps_t + eps_q + upload.vector.count * eps_v / capacity
    assert client.pure_epsilon == pytest.approx(expected_pure)
    assert ledger.epsilon(1e-5) > 0

    # A budget below one more upload's worst case: nothing more is released.
    spent = ledger.epsilon(1e-5)
    budgeted = PrivacyLedger("rdp", budget=PrivacyBudget(spent * 1.01, 1e-5))
    for event in ledger.events:
        budgeted.record(event)
    broke = DSSGDClient(0, torch.zeros(size), budgeted)
    empty = broke.make_upload(delta, settings_, torch.Generator(), 0)
    assert empty.vector.count == 0 and empty.metrics["over_budget"] == 1.0
    assert budgeted.events == ledger.events and broke.uploads == 0
