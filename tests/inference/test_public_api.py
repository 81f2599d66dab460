"""Every inference module declares its public names in ``__all__``, completely."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "veil.inference",
    "veil.inference.artifacts",
    "veil.inference.client",
    "veil.inference.config",
    "veil.inference.device",
    "veil.inference.experiment",
    "veil.inference.export",
    "veil.inference.perturb",
    "veil.inference.query",
    "veil.inference.service",
    "veil.inference.training",
    "veil.models.split",
    "veil.commands.infer",
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
