"""Every attacks module declares its public names in ``__all__``, completely."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "veil.attacks",
    "veil.attacks.audit",
    "veil.attacks.gradient_inversion",
    "veil.attacks.membership",
    "veil.attacks.metrics",
    "veil.attacks.representation",
    "veil.attacks.views",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_complete_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__ and len(module.__doc__.split()) > 20
    assert set(module.__all__) <= set(dir(module))
    defined = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == name
    }
    assert defined <= set(module.__all__), sorted(defined - set(module.__all__))


def test_package_face_exports_every_module_api() -> None:
    package = importlib.import_module("veil.attacks")
    for name in MODULES[1:]:
        module = importlib.import_module(name)
        assert set(module.__all__) <= set(package.__all__), name


def test_core_does_not_import_attacks() -> None:
    import subprocess
    import sys

    code = (
        "import sys, veil.privacy, veil.learning, veil.experiment.runner; "
        "print(any(m.startswith('veil.attacks') for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
