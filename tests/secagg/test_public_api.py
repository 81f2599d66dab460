"""Every secagg module declares its public names in ``__all__``, completely."""

from __future__ import annotations

import importlib

MODULES = [
    "veil.secagg",
    "veil.secagg.client",
    "veil.secagg.crypto",
    "veil.secagg.driver",
    "veil.secagg.fixedpoint",
    "veil.secagg.graph",
    "veil.secagg.messages",
    "veil.secagg.server",
    "veil.secagg.shamir",
    "veil.experiment._secagg",
]


def test_package_face_offers_what_a_caller_needs() -> None:
    package = importlib.import_module("veil.secagg")
    for name in ("SecAggClient", "SecAggServer", "secure_sum", "FixedPoint", "Step"):
        assert name in package.__all__
