"""The privacy ledger: what was released about the protected data, and what it cost.

Every use of a noise mechanism on private data is recorded as an immutable
:class:`PrivacyEvent` (mechanism, parameters, count). The epsilon a run reports is
computed from its ledger, never kept as a running number, so events of different kinds
(DP-SGD steps with different noise multipliers or sample rates, Laplace releases from
other packages) compose correctly under one accountant. A :class:`PrivacyLedger` names
its accountant and neighbouring relation, optionally enforces a
:class:`PrivacyBudget`, and round-trips through JSON, which is how the run directory
stores it and the report shows it.

In the data flow the ledger sits beside a trainer: the DP-SGD trainer asks it how many
steps the budget still affords before it starts, records one event per step, and the
experiment runner saves it with the run's metrics.
"""

from __future__ import annotations

import enum
import functools
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import dp_accounting as dpa

from veil.errors import BudgetExceededError, PrivacyError
from veil.privacy.accounting import (
    Accountant,
    NeighbouringRelation,
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    epsilon_of_event,
)

__all__ = [
    "LEDGER_FORMAT",
    "Mechanism",
    "PrivacyBudget",
    "PrivacyEvent",
    "PrivacyLedger",
]

LEDGER_FORMAT = "veil.privacy-ledger/1"


class Mechanism(enum.StrEnum):
    """Noise mechanisms a ledger can account for."""

    GAUSSIAN = "gaussian"
    LAPLACE = "laplace"


@dataclass(frozen=True)
class PrivacyEvent:
    """``count`` identical uses of a noise mechanism on the protected data.

    Attributes:
        mechanism: ``"gaussian"`` or ``"laplace"``.
        noise_multiplier: noise scale divided by the sensitivity, >= 0: for the
            Gaussian mechanism the standard deviation over the L2 sensitivity (the
            DP-SGD noise multiplier), for the Laplace mechanism the scale ``b`` over the
            L1 sensitivity. 0 means no noise (an infinite epsilon).
        sample_rate: probability, in (0, 1], that each example takes part in a use
            (Poisson sampling); 1 (default) means every example does.
        count: number of uses, integer >= 1; default 1.
        source: free text naming what released the result (``"dpsgd"``, ...); it
            does not change the accounting.
        population: ``None`` (default) for Poisson sampling; otherwise the number of
            records a fixed-size sample is drawn from: each use takes a uniformly
            random subset of exactly ``sample_rate * population`` records (an
            integer), without replacement. Only ``rdp`` under ``replace_one`` can
            account for it (``dp-accounting``'s sampled-without-replacement event).
    """

    mechanism: str
    noise_multiplier: float
    sample_rate: float = 1.0
    count: int = 1
    source: str = ""
    population: int | None = None

    def __post_init__(self) -> None:
        allowed = [m.value for m in Mechanism]
        if self.mechanism not in allowed:
            raise PrivacyError(
                f"mechanism must be one of {allowed}, got {self.mechanism!r}"
            )
        check_noise_multiplier(self.noise_multiplier)
        check_sample_rate(self.sample_rate)
        if isinstance(self.count, bool) or not isinstance(self.count, int):
            raise PrivacyError(f"count must be an integer >= 1, got {self.count!r}")
        if self.count < 1:
            raise PrivacyError(f"count must be an integer >= 1, got {self.count!r}")
        if self.population is not None:
            self._check_population(self.population)

    def _check_population(self, population: int) -> None:
        if isinstance(population, bool) or not isinstance(population, int):
            raise PrivacyError(
                f"population must be an integer >= 1, got {population!r}"
            )
        size = self.sample_rate * population
        if population < 1 or abs(size - round(size)) > 1e-9 * population:
            raise PrivacyError(
                "population must be an integer >= 1 with sample_rate * population a "
                f"whole sample size, got population={population!r} and "
                f"sample_rate={self.sample_rate!r}"
            )

    @property
    def sample_size(self) -> int | None:
        """Records per use under fixed-size sampling; ``None`` under Poisson."""
        if self.population is None:
            return None
        return round(self.sample_rate * self.population)

    @property
    def is_private(self) -> bool:
        """Whether the mechanism adds noise (a noiseless release is not private)."""
        return self.noise_multiplier > 0

    def same_mechanism(self, other: PrivacyEvent) -> bool:
        """Whether ``other`` differs from this event in nothing but its count."""
        return replace(other, count=self.count) == self

    def to_dp_event(self) -> dpa.DpEvent:
        """The equivalent ``dp-accounting`` event."""
        if self.noise_multiplier == 0:
            return dpa.NonPrivateDpEvent()
        step: dpa.DpEvent
        if self.mechanism == Mechanism.GAUSSIAN:
            step = dpa.GaussianDpEvent(self.noise_multiplier)
        else:
            step = dpa.LaplaceDpEvent(self.noise_multiplier)
        if self.population is not None and self.sample_rate < 1:
            step = dpa.SampledWithoutReplacementDpEvent(
                self.population, self.sample_size, step
            )
        elif self.sample_rate < 1:
            step = dpa.PoissonSampledDpEvent(self.sample_rate, step)
        return dpa.SelfComposedDpEvent(step, self.count)

    def to_dict(self) -> dict[str, Any]:
        """The event as plain JSON-ready values (``population`` only when set)."""
        data = asdict(self)
        if self.population is None:
            del data["population"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyEvent:
        """An event from :meth:`to_dict`'s output; unknown keys are refused."""
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise PrivacyError(f"privacy event has unknown keys {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class PrivacyBudget:
    """The most a ledger may spend.

    Attributes:
        epsilon: largest epsilon allowed, > 0 (finite).
        delta: the delta at which epsilon is measured, in (0, 1).
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise PrivacyError(
                f"budget epsilon must be finite and > 0, got {self.epsilon!r}"
            )
        check_delta(self.delta)


@functools.lru_cache(maxsize=256)
def _epsilon(
    events: tuple[PrivacyEvent, ...], delta: float, accountant: str, relation: str
) -> float:
    if not events:
        return 0.0
    if not all(e.is_private for e in events):
        check_delta(delta)
        return math.inf
    composed = dpa.ComposedDpEvent([e.to_dp_event() for e in events])
    return epsilon_of_event(composed, delta, accountant, relation)


class PrivacyLedger:
    """An append-only record of privacy events under one accountant.

    Args:
        accountant: ``"pld"`` (default) or ``"rdp"``; see
            :mod:`veil.privacy.accounting`.
        relation: neighbouring relation, ``"add_or_remove_one"`` (default) or
            ``"replace_one"``.
        budget: the budget to enforce, or ``None`` (default) for none.
        events: events already spent (when restoring a ledger).
    """

    def __init__(
        self,
        accountant: str = "pld",
        relation: str = "add_or_remove_one",
        budget: PrivacyBudget | None = None,
        events: Iterable[PrivacyEvent] = (),
    ) -> None:
        try:
            self._accountant = Accountant(accountant)
            self._relation = NeighbouringRelation(relation)
        except ValueError:
            raise PrivacyError(
                f"accountant must be one of {[a.value for a in Accountant]} and "
                f"relation one of {[r.value for r in NeighbouringRelation]}, got "
                f"{accountant!r} and {relation!r}"
            ) from None
        self._budget = budget
        self._events: list[PrivacyEvent] = []
        for event in events:
            self.record(event)

    @property
    def accountant(self) -> str:
        """The accountant's name."""
        return self._accountant.value

    @property
    def relation(self) -> str:
        """The neighbouring relation's name."""
        return self._relation.value

    @property
    def budget(self) -> PrivacyBudget | None:
        """The enforced budget, if any."""
        return self._budget

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """Every event so far, oldest first (runs of identical events merged)."""
        return tuple(self._events)

    def record(self, event: PrivacyEvent) -> None:
        """Append ``event``; it is merged into the last event when only the count
        differs. Recording does not check the budget: ask :meth:`affordable` first."""
        if self._events and self._events[-1].same_mechanism(event):
            last = self._events[-1]
            self._events[-1] = replace(last, count=last.count + event.count)
        else:
            self._events.append(event)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon of every event so far at ``delta`` (default: the budget's delta)."""
        return _epsilon(self.events, self._delta(delta), self.accountant, self.relation)

    def epsilon_with(self, event: PrivacyEvent, delta: float | None = None) -> float:
        """Epsilon the ledger would reach after also spending ``event``."""
        return _epsilon(
            self._with(event, event.count), self._delta(delta), *self._names()
        )

    def affordable(self, event: PrivacyEvent, limit: int) -> int:
        """How many uses of ``event``'s mechanism (``count`` ignored) the budget still
        affords, at most ``limit``. Without a budget, ``limit``.

        The answer ``k`` is verified: ``epsilon(events + k uses) <= budget.epsilon``.
        """
        if self._budget is None or limit <= 0:
            return max(limit, 0)
        budget = self._budget

        def fits(k: int) -> bool:
            spent = _epsilon(self._with(event, k), budget.delta, *self._names())
            return spent <= budget.epsilon

        if fits(limit):
            return limit
        if not fits(0):
            return 0
        low, high = 0, limit  # fits(low) and not fits(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low

    def check(self, event: PrivacyEvent) -> None:
        """Raise :class:`BudgetExceededError` if spending ``event`` would exceed the
        budget; do nothing otherwise (or without a budget)."""
        if self._budget is None:
            return
        after = self.epsilon_with(event)
        if after > self._budget.epsilon:
            raise BudgetExceededError(
                steps_done=0,
                epsilon_spent=self.epsilon(),
                epsilon_next=after,
                budget_epsilon=self._budget.epsilon,
                budget_delta=self._budget.delta,
            )

    def summary(self, delta: float | None = None) -> dict[str, Any]:
        """What a report shows: epsilon at ``delta`` (default: the budget's), the
        accountant, the neighbouring relation, the budget and the number of uses of
        each mechanism. An infinite epsilon is ``None``."""
        delta = self._delta(delta)
        epsilon = self.epsilon(delta)
        uses: dict[str, int] = {}
        for e in self._events:
            uses[e.mechanism] = uses.get(e.mechanism, 0) + e.count
        return {
            "epsilon": None if math.isinf(epsilon) else epsilon,
            "delta": delta,
            "accountant": self.accountant,
            "relation": self.relation,
            "budget": None if self._budget is None else asdict(self._budget),
            "uses": uses,
        }

    def to_dict(self) -> dict[str, Any]:
        """The ledger as plain JSON-ready values (see :data:`LEDGER_FORMAT`)."""
        budget = None if self._budget is None else asdict(self._budget)
        return {
            "format": LEDGER_FORMAT,
            "accountant": self.accountant,
            "relation": self.relation,
            "budget": budget,
            "events": [e.to_dict() for e in self._events],
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        """A ledger from :meth:`to_dict`'s output."""
        if data.get("format") != LEDGER_FORMAT:
            raise PrivacyError(
                f"ledger format must be {LEDGER_FORMAT!r}, got {data.get('format')!r}"
            )
        budget = data.get("budget")
        return cls(
            accountant=data["accountant"],
            relation=data["relation"],
            budget=None if budget is None else PrivacyBudget(**budget),
            events=[PrivacyEvent.from_dict(e) for e in data["events"]],
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """A ledger from :meth:`to_json`'s output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrivacyError(f"privacy ledger is not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivacyLedger) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(accountant={self.accountant!r}, relation="
            f"{self.relation!r}, budget={self._budget!r}, events={len(self._events)})"
        )

    def _names(self) -> tuple[str, str]:
        return self.accountant, self.relation

    def _delta(self, delta: float | None) -> float:
        if delta is not None:
            return delta
        if self._budget is None:
            raise PrivacyError(
                "delta must be given when the ledger has no budget, got None"
            )
        return self._budget.delta

    def _with(self, event: PrivacyEvent, count: int) -> tuple[PrivacyEvent, ...]:
        if count <= 0:
            return self.events
        probe = PrivacyLedger(self.accountant, self.relation, None, self._events)
        probe.record(replace(event, count=count))
        return probe.events
