"""Every privacy module declares its public names in ``__all__``, completely."""

from __future__ import annotations

import importlib

MODULES = [
    "veil.privacy",
    "veil.privacy.accounting",
    "veil.privacy.dpsgd",
    "veil.privacy.ghost",
    "veil.privacy.grad_sample",
    "veil.privacy.ledger",
    "veil.privacy.noise",
    "veil.privacy.trainer",
    "veil.commands.privacy",
]

# Helpers the package's modules share but users do not need.
INTERNAL = {
    "LossFn",
    "check_delta",
    "check_noise_multiplier",
    "check_sample_rate",
    "check_steps",
}


def test_package_face_exports_each_submodule_api() -> None:
    package = importlib.import_module("veil.privacy")
    for name in MODULES[1:-1]:
        if name.endswith(".ghost"):
            continue  # an engine, reached through noisy_gradient(engine=...)
        module = importlib.import_module(name)
        missing = {n for n in module.__all__ if n not in package.__all__}
        assert missing <= INTERNAL, sorted(missing - INTERNAL)
