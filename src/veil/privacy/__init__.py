"""Differential privacy: accountants, the DP-SGD engine, the privacy ledger and budget.

In veil's data flow this package sits inside a client's local training (and inside
centralised training on pooled data): :class:`DPSGDTrainer` replaces plain SGD with
DP-SGD, records every step in a :class:`PrivacyLedger`, and stops before a step that
would exceed the ledger's :class:`PrivacyBudget`. The epsilon reported for a run is
computed from its ledger by ``dp-accounting`` (:mod:`veil.privacy.accounting`). The
package never trains by itself and never decides when a run starts or stops.
"""

from veil.privacy.accounting import (
    ACCOUNTANTS,
    Accountant,
    NeighbouringRelation,
    calibrate_noise_multiplier,
    dpsgd_epsilon,
    dpsgd_event,
    epsilon_of_event,
    make_accountant,
)
from veil.privacy.dpsgd import (
    ENGINES,
    NoisyGradient,
    NoisyGradientStep,
    clip_factors,
    noisy_gradient,
)
from veil.privacy.grad_sample import (
    check_model,
    per_example_gradients,
    trainable_parameters,
)
from veil.privacy.ledger import (
    LEDGER_FORMAT,
    Mechanism,
    PrivacyBudget,
    PrivacyEvent,
    PrivacyLedger,
)
from veil.privacy.noise import (
    GeneratorNoise,
    InsecureNoiseWarning,
    NoiseSource,
    SecureNoise,
)
from veil.privacy.trainer import DPSGDTrainer

__all__ = [
    "ACCOUNTANTS",
    "ENGINES",
    "LEDGER_FORMAT",
    "Accountant",
    "DPSGDTrainer",
    "GeneratorNoise",
    "InsecureNoiseWarning",
    "Mechanism",
    "NeighbouringRelation",
    "NoiseSource",
    "NoisyGradient",
    "NoisyGradientStep",
    "PrivacyBudget",
    "PrivacyEvent",
    "PrivacyLedger",
    "SecureNoise",
    "calibrate_noise_multiplier",
    "check_model",
    "clip_factors",
    "dpsgd_epsilon",
    "dpsgd_event",
    "epsilon_of_event",
    "make_accountant",
    "noisy_gradient",
    "per_example_gradients",
    "trainable_parameters",
]
