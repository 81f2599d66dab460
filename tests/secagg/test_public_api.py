"""Every secagg module declares its public names in ``__all__``, completely."""

from __future__ import annotations

import importlib
import inspect

import pytest

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


@pytest.mark.parametrize("name", MODULES)
def test_all_is_complete_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__ and len(module.__doc__.split()) > 20
    exported = set(module.__all__)
    assert exported <= set(dir(module))
    defined = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == name
    }
    assert defined <= exported, sorted(defined - exported)


def test_package_face_offers_what_a_caller_needs() -> None:
    package = importlib.import_module("veil.secagg")
    for name in ("SecAggClient", "SecAggServer", "secure_sum", "FixedPoint", "Step"):
        assert name in package.__all__
