"""DPSGDTrainer: a LocalTrainer that records its steps and stops at its budget."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from veil.errors import BudgetExceededError, ConfigError, PrivacyError
from veil.learning import FedAvg, LocalTrainer, TrainStats
from veil.learning._types import ClientTask
from veil.privacy import (
    DPSGDTrainer,
    InsecureNoiseWarning,
    PrivacyBudget,
    PrivacyLedger,
    SecureNoise,
    dpsgd_epsilon,
)
from veil.privacy import noise as noise_module


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))


def data(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 10, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def params(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def trainer(**kwargs: object) -> DPSGDTrainer:
    args: dict = {"lr": 0.5, "clipping_norm": 1.0, "noise_multiplier": 1.0}
    args.update(kwargs)
    if "sample_rate" not in args and "expected_batch_size" not in args:
        args["sample_rate"] = 0.2
    return DPSGDTrainer(**args)


def test_is_a_local_trainer_and_records_each_step() -> None:
    ledger = PrivacyLedger()
    t: LocalTrainer = trainer(epochs=2, ledger=ledger)
    x, y = data()
    stats = t.train(model(), x, y, torch.Generator().manual_seed(0))
    assert isinstance(stats, TrainStats)
    assert stats.steps == 10  # 2 epochs / sample rate 0.2
    (event,) = ledger.events
    assert (event.mechanism, event.noise_multiplier, event.sample_rate) == (
        "gaussian",
        1.0,
        0.2,
    )
    assert event.count == 10
    assert ledger.epsilon(1e-5) == dpsgd_epsilon(1.0, 0.2, 10, 1e-5)


def test_learns_with_little_noise() -> None:
    x, y = data(200)
    m = model()
    before = nn.functional.cross_entropy(m(x), y).item()
    trainer(noise_multiplier=0.1, steps=60, sample_rate=0.25).train(
        m, x, y, torch.Generator().manual_seed(0)
    )
    after = nn.functional.cross_entropy(m(x), y).item()
    assert after < 0.7 * before


def test_same_seed_same_model_and_batch_size_spellings_agree() -> None:
    x, y = data()
    results = []
    for t in (
        trainer(steps=5),
        trainer(steps=5),
        trainer(steps=5, sample_rate=None, expected_batch_size=12),
    ):
        m = model()
        t.train(m, x, y, torch.Generator().manual_seed(3))
        results.append(params(m))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch.testing.assert_close(results[0], results[2])


def test_physical_batches_change_neither_model_nor_ledger() -> None:
    x, y = data()
    runs = []
    for physical in (256, 3):
        ledger, m = PrivacyLedger(), model()
        trainer(steps=4, max_physical_batch=physical, ledger=ledger).train(
            m, x, y, torch.Generator().manual_seed(8)
        )
        runs.append((params(m), ledger.to_dict()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
    assert runs[0][1] == runs[1][1]


def test_budget_stops_before_the_step_that_would_exceed_it() -> None:
    x, y = data()
    budget = PrivacyBudget(2.0, 1e-5)
    ledger = PrivacyLedger("rdp", budget=budget)
    t = trainer(steps=10_000, noise_multiplier=2.0, sample_rate=0.1, ledger=ledger)
    m = model()
    with pytest.raises(BudgetExceededError) as info:
        t.train(m, x, y, torch.Generator().manual_seed(4))
    err = info.value
    k = err.steps_done
    assert 0 < k < 10_000
    assert f"stopped at step {k} because the next step would exceed" in str(err)
    assert "epsilon=2 at delta=1e-05" in str(err)
    assert ledger.events[0].count == k
    assert err.epsilon_spent == ledger.epsilon() <= 2.0 < err.epsilon_next
    assert dpsgd_epsilon(2.0, 0.1, k + 1, 1e-5, "rdp") > 2.0
    assert isinstance(err.result, TrainStats) and err.result.steps == k
    # The model holds exactly the k steps that ran.
    same = model()
    trainer(steps=k, noise_multiplier=2.0, sample_rate=0.1).train(
        same, x, y, torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(params(m), params(same))
    # A spent budget refuses the next call at once.
    with pytest.raises(BudgetExceededError, match="stopped at step 0"):
        t.train(m, x, y, torch.Generator().manual_seed(5))
    assert ledger.events[0].count == k


def test_empty_poisson_batches_are_real_steps() -> None:
    x, y = data(10)
    ledger = PrivacyLedger()
    m = model()
    before = params(m)
    stats = trainer(steps=20, sample_rate=0.001, ledger=ledger).train(
        m, x, y, torch.Generator().manual_seed(6)
    )
    assert stats.steps == 20 and stats.examples_seen == 0
    assert ledger.events[0].count == 20
    assert not torch.equal(before, params(m))  # noise moved the model


def test_fedavg_client_with_its_own_ledger() -> None:
    x, y = data()
    m = model()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ledgers = {0: PrivacyLedger(), 1: PrivacyLedger()}
    base = trainer(steps=3)
    for client, ledger in ledgers.items():
        algo = FedAvg(
            state, num_clients=2, client_fraction=1.0, trainer=base.with_ledger(ledger)
        )
        result = algo.client_fit(ClientTask(client, 1, 7 + client, state), m, x, y)
        assert result.metrics["steps"] == 3
        assert any(bool(u.abs().sum() > 0) for u in result.update.values())
    assert all(led.events[0].count == 3 for led in ledgers.values())


def test_batchnorm_model_is_refused() -> None:
    x, y = data()
    m = nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(PrivacyError, match=r"BatchNorm1d.*GroupNorm"):
        trainer(steps=1).train(m, x, y, torch.Generator())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"clipping_norm": -1.0}, "clipping_norm must be > 0"),
        ({"noise_multiplier": math.inf}, "noise_multiplier must be >= 0"),
        ({"expected_batch_size": 5, "sample_rate": 0.2}, "give exactly one of"),
        ({"sample_rate": 2.0}, r"sample_rate must be in \(0, 1\], got 2.0"),
        ({"steps": 0}, "steps must be >= 1 or None, got 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        trainer(**kwargs)


def test_warns_once_on_the_default_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(noise_module, "_warned", False)
    x, y = data()
    with pytest.warns(InsecureNoiseWarning, match="secure_noise=True"):
        trainer(steps=2).train(model(), x, y, torch.Generator())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer(steps=2).train(model(), x, y, torch.Generator())
        trainer(steps=2, secure_noise=True).train(model(), x, y, torch.Generator())


def test_secure_noise_is_gaussian_and_not_replayable() -> None:
    source = SecureNoise()
    values = source.normal(torch.Size([100_000]), 2.0, torch.float64)
    assert float(values.mean()) == pytest.approx(0.0, abs=4 * 2.0 / math.sqrt(1e5))
    assert float(values.std()) == pytest.approx(2.0, rel=0.02)
    # Fourth moment of a Gaussian is 3 sigma^4: catches a uniform or a bad transform.
    assert float((values / 2.0).pow(4).mean()) == pytest.approx(3.0, rel=0.06)
    x, y = data()
    runs = []
    for _ in range(2):
        m = model()
        trainer(steps=2, secure_noise=True).train(
            m, x, y, torch.Generator().manual_seed(0)
        )
        runs.append(params(m))
    assert not torch.equal(runs[0], runs[1])
