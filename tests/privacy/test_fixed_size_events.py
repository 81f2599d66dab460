"""Fixed-size (without replacement) sampling in the ledger: validation, JSON, and
epsilon equal to dp-accounting's direct answer."""

from __future__ import annotations

import dp_accounting as dpa
import pytest
from dp_accounting import rdp as dpa_rdp

from veil.errors import PrivacyError
from veil.privacy import PrivacyEvent, PrivacyLedger


def test_fixed_size_event_round_trips_and_accounts() -> None:
    ledger = PrivacyLedger("rdp", "replace_one")
    ledger.record(PrivacyEvent("gaussian", 0.8, 0.05, 30, "t", population=2000))
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again == ledger and again.events[0].sample_size == 100

    direct = dpa_rdp.RdpAccountant(
        neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE
    )
    direct.compose(
        dpa.SelfComposedDpEvent(
            dpa.SampledWithoutReplacementDpEvent(2000, 100, dpa.GaussianDpEvent(0.8)),
            30,
        )
    )
    assert again.epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5))


def test_poisson_events_keep_their_json_shape() -> None:
    assert "population" not in PrivacyEvent("gaussian", 1.0, 0.1).to_dict()


@pytest.mark.parametrize(
    ("population", "rate"), [(0, 0.5), (10, 0.25), (True, 1.0), (2.5, 0.4)]
)
def test_bad_population_is_refused(population: object, rate: float) -> None:
    with pytest.raises(PrivacyError, match="population must be"):
        PrivacyEvent("gaussian", 1.0, rate, population=population)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("accountant", "relation"),
    [("pld", "replace_one"), ("rdp", "add_or_remove_one")],
)
def test_fixed_size_needs_rdp_under_replace_one(accountant: str, relation: str) -> None:
    ledger = PrivacyLedger(accountant, relation)
    ledger.record(PrivacyEvent("gaussian", 1.0, 0.1, population=100))
    with pytest.raises(PrivacyError, match="fixed-size sampling needs accountant"):
        ledger.epsilon(1e-5)
