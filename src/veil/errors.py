"""The exceptions veil raises at its boundaries.

Every error says what was wrong, what is allowed and what was found, so that a user can
fix the input without reading veil's code. The CLI maps them to exit codes.
"""

from __future__ import annotations

__all__ = [
    "BudgetExceededError",
    "ConfigError",
    "DataError",
    "MessageError",
    "PrivacyError",
    "RoundAbortedError",
    "RoundFailedError",
    "SecAggError",
    "ServiceError",
    "UpdateError",
    "VeilError",
]


class VeilError(Exception):
    """Base class of every error veil raises on purpose."""


class DataError(VeilError):
    """A dataset is missing, corrupt, or cannot be split as asked."""


class ConfigError(VeilError):
    """An experiment config has an unknown key or a bad value."""


class UpdateError(VeilError):
    """A client update was refused (wrong names or shapes, NaN, zero weight)."""


class SecAggError(VeilError):
    """Secure aggregation was asked for something it must refuse (a parameter that
    would break the guarantee or wrap the sum, a request out of protocol order)."""


class MessageError(SecAggError):
    """A secure aggregation message is malformed, forged, replayed or from another
    round. The server drops its sender from the round; the round goes on."""


class RoundAbortedError(SecAggError):
    """Too few clients are left for the secure aggregation round to finish: no sum is
    returned and nothing about any one client's update is revealed.

    Attributes:
        bytes_up: bytes the clients had sent when the round stopped (0 if unknown).
        bytes_down: bytes the clients had received.
    """

    bytes_up: int = 0
    bytes_down: int = 0


class RoundFailedError(VeilError):
    """A federated round ended without enough results by its deadline: nothing was
    aggregated and the global model is unchanged."""


class PrivacyError(VeilError):
    """A request would break or cannot state a privacy guarantee (a model that mixes
    examples, an accountant that cannot handle a mechanism, a bad privacy parameter)."""


class BudgetExceededError(PrivacyError):
    """The next use of a mechanism would spend more privacy than the budget allows.

    Raised *before* the offending step runs: everything recorded so far is within the
    budget. The attributes let a runner report exactly where and why it stopped.

    Attributes:
        steps_done: steps (mechanism uses) completed in the call that stopped, >= 0.
        epsilon_spent: epsilon of everything recorded so far, at the budget's delta.
        epsilon_next: epsilon the ledger would reach with one more step (may be inf).
        budget_epsilon: the epsilon of the budget.
        budget_delta: the delta of the budget.
        result: what the stopped call had produced so far (a ``TrainStats`` for a
            trainer), or ``None``.
    """

    def __init__(
        self,
        *,
        steps_done: int,
        epsilon_spent: float,
        epsilon_next: float,
        budget_epsilon: float,
        budget_delta: float,
        result: object = None,
    ) -> None:
        self.steps_done = steps_done
        self.epsilon_spent = epsilon_spent
        self.epsilon_next = epsilon_next
        self.budget_epsilon = budget_epsilon
        self.budget_delta = budget_delta
        self.result = result
        super().__init__(
            f"stopped at step {steps_done} because the next step would exceed the "
            f"privacy budget epsilon={budget_epsilon:g} at delta={budget_delta:g} "
            f"(spent {epsilon_spent:.4g}, the next step would reach "
            f"{epsilon_next:.4g})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only __init__: rebuild from the attributes, so the error survives
        # pickling (a client that stopped in a Ray worker reports it to the driver).
        keys = ["steps_done", "epsilon_spent", "epsilon_next"]
        keys += ["budget_epsilon", "budget_delta", "result"]
        return (_rebuild_budget_error, ({k: getattr(self, k) for k in keys},))


def _rebuild_budget_error(attributes: dict[str, object]) -> BudgetExceededError:
    return BudgetExceededError(**attributes)  # type: ignore[arg-type]


class ServiceError(VeilError):
    """A request to a veil HTTP service was refused or could not be answered.

    Attributes:
        status_code: the HTTP status the service answers with (4xx: the request
            was wrong; 5xx or 0: the service failed or could not be reached).
    """

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code
