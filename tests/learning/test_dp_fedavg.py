"""DP-FedAvg: sampling, noise on the average (once, either placement), accounting,
adaptive clipping in the loop, refusals that change nothing."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import pld as dpa_pld
from dp_accounting import rdp as dpa_rdp
from scipy import stats
from torch import nn

from tests.conftest import make_tiny
from veil.data import iid
from veil.errors import BudgetExceededError, PrivacyError, UpdateError
from veil.learning import (
    AdaptiveClipping,
    ClientResult,
    DPFedAvg,
    SGDTrainer,
    TrainStats,
    combined_noise_multiplier,
    update_norm,
)
from veil.models import build_model
from veil.privacy import PrivacyBudget, PrivacyLedger
from veil.runtime import SimulationRuntime

pytestmark = pytest.mark.filterwarnings("ignore::veil.privacy.InsecureNoiseWarning")

DIM = 20_000


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the machine is shared, and small models gain nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Vector(nn.Module):
    """A model that is one parameter vector (its output is never used)."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))


@dataclass(frozen=True)
class SetUpdate:
    """A stand-in trainer: moves the model by ``norm_of(client)`` along e_0.

    The client is read from its data: ``x[0]`` holds the client id.
    """

    norms: tuple[float, ...]

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> TrainStats:
        with torch.no_grad():
            model.w[0] += self.norms[int(x[0])]
        return TrainStats(0.0, 1, len(y))


def run_round(algo: DPFedAvg, rnd: int, num_clients: int, dim: int = DIM) -> None:
    model = Vector(dim)
    tasks = algo.configure_round(rnd)
    results = [
        algo.client_fit(t, model, torch.tensor([float(t.client_id)]), torch.zeros(1))
        for t in tasks
    ]
    algo.aggregate(rnd, results)


def make(
    num_clients: int = 10,
    sample_rate: float = 0.5,
    norms: tuple[float, ...] | None = None,
    dim: int = DIM,
    **kwargs: object,
) -> DPFedAvg:
    settings: dict[str, object] = {
        "clipping_norm": 2.0,
        "noise_multiplier": 1.5,
        "ledger": PrivacyLedger(),
        "seed": 3,
    }
    settings.update(kwargs)
    return DPFedAvg(
        global_state={"w": torch.zeros(dim)},
        num_clients=num_clients,
        sample_rate=sample_rate,
        trainer=SetUpdate(norms or (0.0,) * num_clients),
        **settings,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("placement", ["central", "distributed"])
@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_noise_std_on_the_average_is_z_s_over_expected_clients(
    placement: str, sampling: str
) -> None:
    # Zero updates: the averaged update is pure noise, N(0, (z S / (q N))^2) per
    # entry, whatever the number of clients actually sampled. Adding the noise twice
    # (server and clients) would give sqrt(2) times that; a chi-square interval on
    # 20,000 entries tells the two apart with room to spare.
    algo = make(placement=placement, sampling=sampling)
    run_round(algo, 1, 10)
    noise = algo.global_state["w"].double().numpy()
    expected = 1.5 * 2.0 / 5.0
    low, high = stats.chi2.ppf([1e-4, 1 - 1e-4], DIM) / DIM
    ratio = float(np.mean(noise**2)) / expected**2
    assert low < ratio < high
    assert abs(float(np.mean(noise))) < 5 * expected / math.sqrt(DIM)


def test_distributed_dropouts_are_topped_up_by_the_server() -> None:
    # 5 clients sampled, 2 drop out: the server adds the missing 2/5 of the variance.
    algo = make(placement="distributed", sampling="fixed")
    tasks = algo.configure_round(1)
    results = [
        algo.client_fit(t, Vector(), torch.tensor([0.0]), torch.zeros(1))
        for t in tasks[:3]
    ]
    algo.aggregate(1, results)
    std = float(algo.global_state["w"].double().std())
    assert std == pytest.approx(1.5 * 2.0 / 5.0, rel=0.03)


def test_central_clients_send_no_noise_and_distributed_clients_send_shares() -> None:
    for placement, share in [("central", 0.0), ("distributed", 1.5 * 2.0 / 5**0.5)]:
        algo = make(placement=placement, sampling="fixed")
        task = algo.configure_round(1)[0]
        result = algo.client_fit(task, Vector(), torch.tensor([0.0]), torch.zeros(1))
        std = float(result.update["w"].double().std())
        assert std == pytest.approx(share, rel=0.03, abs=1e-12)


def test_noise_std_with_adaptive_clipping_uses_the_update_share() -> None:
    # The accounted z covers update and count; the update's own multiplier is larger.
    adaptive = AdaptiveClipping(count_noise_multiplier=5.0)
    algo = make(sampling="fixed", adaptive=adaptive, noise_multiplier=1.0)
    run_round(algo, 1, 10)
    z_update = algo.update_multiplier
    assert combined_noise_multiplier(z_update, 5.0) == pytest.approx(1.0)
    std = float(algo.global_state["w"].double().std())
    assert std == pytest.approx(z_update * 2.0 / 5.0, rel=0.03)


def test_clipped_updates_average_over_expected_clients() -> None:
    # No noise, fixed-size sampling of all 4 clients: norms 1, 3, 5, 7 clipped to 4
    # give 1 + 3 + 4 + 4 = 12 along e_0, divided by q N = 4.
    algo = make(
        num_clients=4, sample_rate=1.0, norms=(1.0, 3.0, 5.0, 7.0), dim=3,
        sampling="fixed", noise_multiplier=0.0, clipping_norm=4.0,
    )  # fmt: skip
    run_round(algo, 1, 4, dim=3)
    assert torch.allclose(algo.global_state["w"], torch.tensor([3.0, 0.0, 0.0]))


def test_server_reclips_an_oversized_update_under_central_dp() -> None:
    algo = make(num_clients=2, sample_rate=1.0, dim=2, noise_multiplier=0.0)
    algo.configure_round(1)
    big = ClientResult(0, 1, {"w": torch.tensor([30.0, 40.0])}, 1, 0.0)
    algo.aggregate(1, [big])
    # Clipped to norm 2, divided by the 2 expected clients: norm 1.
    assert update_norm(algo.global_state) == pytest.approx(1.0)


@pytest.mark.parametrize("q", [0.05, 0.3])
def test_poisson_sampling_rate(q: float) -> None:
    algo = make(num_clients=200, sample_rate=q, dim=1)
    counts = [len(algo.sample_clients(rnd)) for rnd in range(1, 201)]
    # 200 rounds x 200 clients Bernoulli(q): a two-sided binomial test.
    test = stats.binomtest(sum(counts), 200 * 200, q)
    assert test.pvalue > 1e-4
    assert len(set(counts)) > 1  # the round size itself is random


def test_fixed_size_sampling_takes_exactly_q_n_distinct_clients() -> None:
    algo = make(num_clients=50, sample_rate=0.2, dim=1, sampling="fixed")
    seen = np.zeros(50)
    for rnd in range(1, 501):
        chosen = algo.sample_clients(rnd)
        assert len(chosen) == len(set(chosen)) == 10
        seen[chosen] += 1
    # Every client equally likely: a chi-square test of uniformity.
    assert stats.chisquare(seen).pvalue > 1e-4


def test_poisson_ledger_equals_the_direct_pld_answer() -> None:
    algo = make(num_clients=100, sample_rate=0.1, dim=1, noise_multiplier=1.1)
    for rnd in range(1, 6):
        run_round(algo, rnd, 100, dim=1)
    accountant = dpa_pld.PLDAccountant()
    accountant.compose(
        dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.1)), 5
        )
    )
    assert algo.ledger.epsilon(1e-3) == pytest.approx(accountant.get_epsilon(1e-3))


def test_fixed_size_ledger_equals_the_direct_rdp_answer() -> None:
    ledger = PrivacyLedger("rdp", "replace_one")
    algo = make(
        num_clients=100, sample_rate=0.1, dim=1, noise_multiplier=1.1,
        sampling="fixed", ledger=ledger,
    )  # fmt: skip
    for rnd in range(1, 6):
        run_round(algo, rnd, 100, dim=1)
    # Replacing one client moves the sum by up to 2 S: noise over sensitivity z / 2.
    event = dpa.SampledWithoutReplacementDpEvent(100, 10, dpa.GaussianDpEvent(0.55))
    accountant = dpa_rdp.RdpAccountant(
        neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE
    )
    accountant.compose(dpa.SelfComposedDpEvent(event, 5))
    assert ledger.epsilon(1e-3) == pytest.approx(accountant.get_epsilon(1e-3))
    assert ledger.events[0].source == "dp-fedavg/central"


def test_fixed_size_sampling_under_add_remove_is_refused() -> None:
    algo = make(num_clients=100, sample_rate=0.1, dim=1, sampling="fixed")
    run_round(algo, 1, 100, dim=1)
    with pytest.raises(PrivacyError, match="fixed-size sampling needs accountant"):
        algo.ledger.epsilon(1e-3)


def test_adaptive_clipping_in_the_loop_tracks_the_median_norm() -> None:
    # 100 clients with update norms 0.01..1.00; all sampled; target the median.
    norms = tuple((k + 1) / 100 for k in range(100))
    algo = make(
        num_clients=100, sample_rate=1.0, norms=norms, dim=1, sampling="fixed",
        clipping_norm=0.05, noise_multiplier=0.5,
        adaptive=AdaptiveClipping(count_noise_multiplier=5.0, learning_rate=0.2),
    )  # fmt: skip
    for rnd in range(1, 121):
        run_round(algo, rnd, 100, dim=1)
    tail = [r.clipping_norm for r in algo.history[-40:]]
    assert np.mean(tail) == pytest.approx(0.505, abs=0.08)
    assert algo.ledger.events[0].noise_multiplier == 0.25  # z / 2 under replace-one


def test_budget_stops_before_sampling_and_changes_nothing() -> None:
    ledger = PrivacyLedger("rdp", budget=PrivacyBudget(3.0, 1e-3))
    algo = make(num_clients=10, sample_rate=0.5, dim=1, ledger=ledger)
    rnd = 0
    with pytest.raises(BudgetExceededError):
        for rnd in range(1, 1000):
            algo.configure_round(rnd)
            algo.aggregate(rnd, [])
    assert ledger.epsilon() <= 3.0
    assert rnd > 2 and ledger.events[0].count == rnd - 1


def test_refused_result_changes_nothing() -> None:
    algo = make(num_clients=2, sample_rate=1.0, dim=2)
    before = algo.global_state["w"].clone()
    bad = ClientResult(0, 2, {"w": torch.zeros(2)}, 1, 0.0)
    with pytest.raises(UpdateError, match="round 2"):
        algo.aggregate(1, [bad])
    nan = ClientResult(0, 1, {"w": torch.tensor([math.nan, 0.0])}, 1, 0.0)
    with pytest.raises(UpdateError, match="NaN"):
        algo.aggregate(1, [nan])
    assert torch.equal(algo.global_state["w"], before)
    assert algo.ledger.events == () and algo.history == []


def test_fixed_size_needs_a_whole_sample() -> None:
    with pytest.raises(Exception, match="whole number"):
        make(num_clients=10, sample_rate=0.25, sampling="fixed")


def test_real_training_is_deterministic_and_learns() -> None:
    data = make_tiny()
    clients = iid(len(data.train), 10, np.random.default_rng(0))

    def train() -> tuple[dict[str, torch.Tensor], float]:
        torch.manual_seed(0)
        model = build_model("2nn")
        algo = DPFedAvg(
            global_state={k: v.clone() for k, v in model.state_dict().items()},
            num_clients=10,
            sample_rate=0.5,
            clipping_norm=1.0,
            noise_multiplier=0.02,
            trainer=SGDTrainer(lr=0.1, epochs=1, batch_size=10),
            ledger=PrivacyLedger(),
            placement="distributed",
            adaptive=AdaptiveClipping(count_noise_multiplier=1.0),
            server_momentum=0.5,
        )
        runtime = SimulationRuntime(lambda: build_model("2nn"), data.train, clients)
        for rnd in range(1, 3):
            runtime.run_round(algo, rnd)
        model.load_state_dict(algo.global_state)
        correct = (model(data.test.x).argmax(1) == data.test.y).float().mean()
        return algo.global_state, float(correct)

    first, accuracy = train()
    second, _ = train()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert accuracy > 0.2  # chance is 0.1
