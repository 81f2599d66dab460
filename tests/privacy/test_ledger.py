"""The privacy ledger: immutable events, heterogeneous composition, JSON, budgets."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import BudgetExceededError, PrivacyError
from veil.privacy import PrivacyBudget, PrivacyEvent, PrivacyLedger, dpsgd_epsilon

DELTA = 1e-5


def gaussian(z: float, q: float, count: int = 1) -> PrivacyEvent:
    return PrivacyEvent("gaussian", z, q, count, "dpsgd")


def test_events_are_immutable() -> None:
    event = gaussian(1.0, 0.01)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.count = 5  # type: ignore[misc]
    ledger = PrivacyLedger()
    ledger.record(event)
    assert isinstance(ledger.events, tuple)
    assert ledger.events[0] is event  # recorded as given, not copied and changed


def test_identical_events_merge_and_match_dpsgd_epsilon() -> None:
    ledger = PrivacyLedger(accountant="rdp")
    for _ in range(300):
        ledger.record(gaussian(1.1, 0.02))
    assert ledger.events == (gaussian(1.1, 0.02, 300),)
    assert ledger.epsilon(DELTA) == dpsgd_epsilon(1.1, 0.02, 300, DELTA, "rdp")


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_heterogeneous_events_compose(accountant: str) -> None:
    a = gaussian(1.0, 0.01, 200)
    b = gaussian(2.0, 0.05, 100)
    c = PrivacyEvent("laplace", 10.0, 1.0, 2, "release")

    def eps(*events: PrivacyEvent, delta: float = DELTA) -> float:
        return PrivacyLedger(accountant, events=events).epsilon(delta)

    both = eps(a, b, c)
    # Order does not matter.
    assert both == pytest.approx(eps(c, b, a), rel=1e-6)
    # Composition costs at least as much as any part ...
    assert both >= max(eps(a), eps(b), eps(c)) - 1e-9
    # ... and no more than basic composition of the parts (delta split three ways).
    assert both <= eps(a, delta=DELTA / 3) + eps(b, delta=DELTA / 3) + eps(
        c, delta=DELTA / 3
    )


def test_noiseless_event_makes_epsilon_infinite() -> None:
    ledger = PrivacyLedger(events=[gaussian(1.0, 0.01, 10), gaussian(0.0, 0.01)])
    assert ledger.epsilon(DELTA) == math.inf


def test_laplace_under_replace_one_is_refused() -> None:
    ledger = PrivacyLedger("pld", "replace_one", events=[PrivacyEvent("laplace", 1.0)])
    with pytest.raises(PrivacyError, match=r"cannot account.*'replace_one'"):
        ledger.epsilon(DELTA)


@given(
    z=st.floats(0.5, 5.0),
    q=st.floats(1e-3, 1.0),
    count=st.integers(1, 10_000),
    accountant=st.sampled_from(["pld", "rdp"]),
    relation=st.sampled_from(["add_or_remove_one", "replace_one"]),
    budget=st.none() | st.builds(PrivacyBudget, st.floats(0.1, 10), st.just(DELTA)),
)
def test_json_round_trip(
    z: float,
    q: float,
    count: int,
    accountant: str,
    relation: str,
    budget: PrivacyBudget | None,
) -> None:
    events = [gaussian(z, q, count), PrivacyEvent("laplace", 3.0, 1.0, 1, "other")]
    ledger = PrivacyLedger(accountant, relation, budget, events)
    restored = PrivacyLedger.from_json(ledger.to_json())
    assert restored == ledger
    assert restored.events == ledger.events
    assert (restored.accountant, restored.relation) == (accountant, relation)


def test_json_errors_are_clear() -> None:
    with pytest.raises(PrivacyError, match="not valid JSON"):
        PrivacyLedger.from_json("{")
    with pytest.raises(PrivacyError, match="ledger format must be"):
        PrivacyLedger.from_json('{"format": "other"}')
    with pytest.raises(PrivacyError, match=r"unknown keys \['sigma'\]"):
        PrivacyEvent.from_dict(
            {"mechanism": "gaussian", "noise_multiplier": 1.0, "sigma": 2}
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mechanism": "exponential"}, "mechanism must be one of"),
        ({"noise_multiplier": -0.5}, "noise_multiplier must be finite and >= 0"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\]"),
        ({"count": 0}, "count must be an integer >= 1, got 0"),
    ],
)
def test_bad_events_are_refused(kwargs: dict, match: str) -> None:
    args = {"mechanism": "gaussian", "noise_multiplier": 1.0, **kwargs}
    with pytest.raises(PrivacyError, match=match):
        PrivacyEvent(**args)


@settings(max_examples=15, deadline=None)
@given(epsilon=st.floats(0.3, 5.0), spent=st.integers(0, 200))
def test_affordable_is_the_exact_limit(epsilon: float, spent: int) -> None:
    budget = PrivacyBudget(epsilon, DELTA)
    step = gaussian(1.0, 0.01)
    events = [gaussian(1.0, 0.01, spent)] if spent else []
    ledger = PrivacyLedger("rdp", budget=budget, events=events)
    k = ledger.affordable(step, 5000)
    within = PrivacyLedger(
        "rdp", events=[*events, gaussian(1.0, 0.01, k)] if k else events
    )
    assert 0 <= k <= 5000
    if k > 0:
        assert within.epsilon(DELTA) <= epsilon
    if k < 5000:
        assert ledger.epsilon_with(gaussian(1.0, 0.01, k + 1)) > epsilon


def test_check_raises_before_exceeding() -> None:
    ledger = PrivacyLedger("rdp", budget=PrivacyBudget(1.0, DELTA))
    ledger.check(gaussian(3.0, 0.01, 10))
    with pytest.raises(BudgetExceededError, match=r"epsilon=1 at delta=1e-05"):
        ledger.check(gaussian(3.0, 0.01, 100_000))
    assert ledger.events == ()


def test_delta_is_required_without_budget() -> None:
    with pytest.raises(PrivacyError, match="delta must be given"):
        PrivacyLedger().epsilon()


def test_summary_names_accountant_relation_and_uses() -> None:
    events = [
        gaussian(1.0, 0.01, 30),
        PrivacyEvent("laplace", 5.0),
        gaussian(1.0, 0.01),
    ]
    ledger = PrivacyLedger(
        "rdp", "add_or_remove_one", PrivacyBudget(8.0, DELTA), events
    )
    summary = ledger.summary()
    assert summary["epsilon"] == ledger.epsilon(DELTA) > 0
    assert (summary["accountant"], summary["relation"]) == ("rdp", "add_or_remove_one")
    assert summary["uses"] == {"gaussian": 31, "laplace": 1}
    assert summary["budget"] == {"epsilon": 8.0, "delta": DELTA}
    noiseless = PrivacyLedger(events=[gaussian(0.0, 1.0)]).summary(DELTA)
    assert noiseless["epsilon"] is None
