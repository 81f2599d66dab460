"""Privacy accounting: the (epsilon, delta) that a sequence of mechanism uses spends.

This is where every privacy number veil reports comes from. The arithmetic is done by
Google's ``dp-accounting`` library; this module only chooses the accountant, states the
neighbouring relation, validates inputs at the boundary and searches for the noise
multiplier that meets a target epsilon. The DP-SGD trainer and the privacy ledger
(:mod:`veil.privacy.ledger`) both call it; so does ``veil privacy epsilon``.

Accountants:

- ``pld`` (default): privacy loss distributions (Koskela et al. 2020, Doroshenko et
  al. 2022). A pessimistic discretisation, so the epsilon it reports is an upper bound,
  and the tightest of the two. It cannot resolve a delta below the probability mass its
  discretisation truncates (about 1e-15): such a request is refused.
- ``rdp``: Renyi differential privacy (Mironov 2017; Mironov, Talwar and Zhang 2019),
  converted to (epsilon, delta) with the improved bound of Canonne, Kamath and Steinke
  (2020). Looser than ``pld`` but fast and valid for any delta > 0.

Neighbouring relations (what "one example" means):

- ``add_or_remove_one`` (default): the datasets differ by one example present in one and
  absent from the other. This is the relation Poisson sampling is analysed under.
- ``replace_one``: the datasets have the same size and differ in one example. A
  replace-one guarantee is weaker than the add/remove one of the same epsilon would
  suggest (roughly twice the epsilon for DP-SGD); only ``pld`` handles Poisson-sampled
  Gaussian steps under it, ``rdp`` refuses.

Every function here is a pure function of its arguments: asking twice gives the same
answer.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import dp_accounting as dpa
from dp_accounting import pld as dpa_pld
from dp_accounting import rdp as dpa_rdp

from veil.errors import PrivacyError

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "NeighbouringRelation",
    "calibrate_noise_multiplier",
    "check_delta",
    "check_noise_multiplier",
    "check_sample_rate",
    "check_steps",
    "dpsgd_epsilon",
    "dpsgd_event",
    "epsilon_of_event",
    "make_accountant",
]


class Accountant(enum.StrEnum):
    """The accountants veil offers (see the module docstring)."""

    PLD = "pld"
    RDP = "rdp"


class NeighbouringRelation(enum.StrEnum):
    """Which pairs of datasets the guarantee holds between (see the module doc)."""

    ADD_OR_REMOVE_ONE = "add_or_remove_one"
    REPLACE_ONE = "replace_one"


ACCOUNTANTS: tuple[str, ...] = tuple(a.value for a in Accountant)

_RELATIONS = {
    NeighbouringRelation.ADD_OR_REMOVE_ONE: dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
    NeighbouringRelation.REPLACE_ONE: dpa.NeighboringRelation.REPLACE_ONE,
}
# Largest noise multiplier the calibration tries before calling a target unreachable.
_MAX_NOISE_MULTIPLIER = 2.0**20


def _accountant(value: str) -> Accountant:
    try:
        return Accountant(value)
    except ValueError:
        raise PrivacyError(
            f"accountant must be one of {list(ACCOUNTANTS)}, got {value!r}"
        ) from None


def _relation(value: str) -> NeighbouringRelation:
    try:
        return NeighbouringRelation(value)
    except ValueError:
        allowed = [r.value for r in NeighbouringRelation]
        raise PrivacyError(
            f"neighbouring relation must be one of {allowed}, got {value!r}"
        ) from None


def check_delta(delta: float) -> None:
    """Refuse a delta outside (0, 1)."""
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")


def check_noise_multiplier(noise_multiplier: float) -> None:
    """Refuse a noise multiplier that is negative, NaN or infinite."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise PrivacyError(
            f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}"
        )


def check_sample_rate(sample_rate: float) -> None:
    """Refuse a sample rate outside (0, 1]."""
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise PrivacyError(f"sample_rate must be in (0, 1], got {sample_rate!r}")


def check_steps(steps: int) -> None:
    """Refuse a step count that is not a non-negative integer."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise PrivacyError(f"steps must be an integer >= 0, got {steps!r}")


def make_accountant(
    accountant: str = "pld", relation: str = "add_or_remove_one"
) -> dpa.PrivacyAccountant:
    """A fresh, empty ``dp-accounting`` accountant.

    Args:
        accountant: ``"pld"`` (default) or ``"rdp"``.
        relation: ``"add_or_remove_one"`` (default) or ``"replace_one"``.
    """
    dpa_relation = _RELATIONS[_relation(relation)]
    if _accountant(accountant) is Accountant.PLD:
        return dpa_pld.PLDAccountant(neighboring_relation=dpa_relation)
    return dpa_rdp.RdpAccountant(neighboring_relation=dpa_relation)


def dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dpa.DpEvent:
    """The ``dp-accounting`` event of ``steps`` DP-SGD steps.

    Each step is a Gaussian mechanism of ``noise_multiplier`` applied to a Poisson
    sample with inclusion probability ``sample_rate``; at ``sample_rate == 1`` every
    example is in every batch and the event is a plain Gaussian mechanism.
    """
    check_noise_multiplier(noise_multiplier)
    check_sample_rate(sample_rate)
    check_steps(steps)
    if steps == 0:
        return dpa.NoOpDpEvent()
    step: dpa.DpEvent = dpa.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        step = dpa.PoissonSampledDpEvent(sample_rate, step)
    return dpa.SelfComposedDpEvent(step, steps)


def epsilon_of_event(
    event: dpa.DpEvent,
    delta: float,
    accountant: str = "pld",
    relation: str = "add_or_remove_one",
    *,
    private: bool = True,
) -> float:
    """Epsilon of ``event`` at ``delta``.

    Args:
        event: any ``dp-accounting`` event (composed events included).
        delta: in (0, 1).
        accountant: ``"pld"`` (default) or ``"rdp"``.
        relation: ``"add_or_remove_one"`` (default) or ``"replace_one"``.
        private: whether every mechanism in ``event`` adds noise; when it does and the
            accountant still answers infinity, the answer is a numerical limit of the
            accountant (delta too small) and is refused rather than reported.

    Returns:
        epsilon >= 0, ``math.inf`` when the event holds a mechanism without noise.

    Raises:
        PrivacyError: a bad argument, an event the accountant cannot handle under
            ``relation``, or a delta the accountant cannot resolve.
    """
    check_delta(delta)
    acc = make_accountant(accountant, relation)
    if not acc.supports(event):
        hint = " (use accountant 'pld')" if accountant == Accountant.RDP else ""
        if "SampledWithoutReplacement" in str(event):
            hint = (
                " (fixed-size sampling needs accountant 'rdp', relation 'replace_one')"
            )
        raise PrivacyError(
            f"accountant {accountant!r} cannot account for {event} under the "
            f"{relation!r} neighbouring relation{hint}"
        )
    try:
        acc.compose(event)
        epsilon = float(acc.get_epsilon(delta))
    except MemoryError:
        # The PLD accountant discretises the privacy loss; a tiny noise multiplier
        # or a huge number of steps makes that grid larger than memory.
        raise PrivacyError(
            f"accountant {accountant!r} ran out of memory on {event} (a very small "
            "noise multiplier or very many steps make its grid too large); use "
            "accountant 'rdp', which answers in constant memory"
        ) from None
    if math.isinf(epsilon) and private:
        raise PrivacyError(
            f"accountant {accountant!r} cannot resolve delta={delta:g}: it is below "
            "the probability mass the accountant's discretisation truncates; use a "
            "larger delta (>= 1e-14) or accountant 'rdp'"
        )
    return max(epsilon, 0.0)


def dpsgd_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    relation: str = "add_or_remove_one",
) -> float:
    """Epsilon spent by ``steps`` steps of DP-SGD.

    Args:
        noise_multiplier: noise standard deviation divided by the clipping norm,
            >= 0 (0 means no noise, and an infinite epsilon once a step is taken).
        sample_rate: probability that an example is in a step's batch (Poisson
            sampling), in (0, 1].
        steps: number of steps, integer >= 0 (0 spends nothing: epsilon 0).
        delta: target delta, in (0, 1); typically well below 1 / dataset size.
        accountant: ``"pld"`` (default) or ``"rdp"``.
        relation: ``"add_or_remove_one"`` (default) or ``"replace_one"``.

    Returns:
        The smallest epsilon the accountant can certify at ``delta``.
    """
    event = dpsgd_event(noise_multiplier, sample_rate, steps)
    if steps > 0 and noise_multiplier == 0:
        check_delta(delta)
        return math.inf
    return epsilon_of_event(event, delta, accountant, relation)


def calibrate_noise_multiplier(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    relation: str = "add_or_remove_one",
    tolerance: float = 1e-3,
) -> float:
    """The smallest noise multiplier (to within ``tolerance``) whose epsilon is at
    most ``target_epsilon``.

    The answer never overshoots: ``dpsgd_epsilon(answer, ...) <= target_epsilon`` is
    checked before returning. The search first brackets the answer by doubling or
    halving from 1, then narrows it with ``dp-accounting``'s calibration (Brent's
    method), which keeps the side that meets the target.

    Args:
        target_epsilon: the epsilon to meet, > 0.
        sample_rate: Poisson sample rate, in (0, 1].
        steps: number of DP-SGD steps, integer >= 0 (0 needs no noise: returns 0).
        delta: target delta, in (0, 1).
        accountant: ``"pld"`` (default) or ``"rdp"``.
        relation: ``"add_or_remove_one"`` (default) or ``"replace_one"``.
        tolerance: absolute precision of the answer, > 0; default 1e-3.

    Raises:
        PrivacyError: a bad argument, or a target no noise multiplier up to 2**20
            reaches.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyError(
            f"target_epsilon must be finite and > 0, got {target_epsilon!r}"
        )
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise PrivacyError(f"tolerance must be finite and > 0, got {tolerance!r}")
    check_sample_rate(sample_rate)
    check_steps(steps)
    check_delta(delta)
    if steps == 0:
        return 0.0

    def eps(z: float) -> float:
        return dpsgd_epsilon(z, sample_rate, steps, delta, accountant, relation)

    # Bracket: `high` meets the target, `low` does not. PLD is slow at small noise
    # multipliers, so it starts from the (fast, never smaller) RDP answer.
    start, factor = 1.0, 2.0
    add_remove = _relation(relation) is NeighbouringRelation.ADD_OR_REMOVE_ONE
    if _accountant(accountant) is Accountant.PLD and add_remove:
        start = calibrate_noise_multiplier(
            target_epsilon, sample_rate, steps, delta, "rdp", relation, tolerance
        )
        factor = 1.25
    where = f"at delta={delta:g} with sample_rate={sample_rate:g} and steps={steps}"
    low, high = _bracket(eps, target_epsilon, start, factor, where)
    if low == 0 or high - low <= tolerance:
        return high

    found = dpa.calibrate_dp_mechanism(
        lambda: make_accountant(accountant, relation),
        lambda z: dpsgd_event(z, sample_rate, steps),
        target_epsilon,
        delta,
        bracket_interval=dpa.ExplicitBracketInterval(low, high),
        tol=tolerance,
    )
    # dp-accounting keeps the side with a non-positive gap; hold it to that.
    answer = min(float(found), high)
    return answer if eps(answer) <= target_epsilon else high


def _bracket(
    eps: Callable[[float], float],
    target: float,
    start: float,
    factor: float,
    where: str,
) -> tuple[float, float]:
    """``(low, high)`` with ``eps(low) > target >= eps(high)``, searching
    geometrically from ``start``; ``low`` is 0 when tiny noise already meets it."""
    high = start
    while eps(high) > target:
        high *= factor
        if high > _MAX_NOISE_MULTIPLIER:
            raise PrivacyError(
                f"target_epsilon={target:g} is out of reach {where}: even "
                f"noise_multiplier={_MAX_NOISE_MULTIPLIER:g} exceeds it"
            )
    low = high / factor
    while eps(low) <= target:
        high, low = low, low / factor
        if high < 1e-6:
            return 0.0, high
    return low, high
