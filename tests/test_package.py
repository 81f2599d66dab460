"""The public surface: every module says what it is for, and __all__ is truthful."""

from __future__ import annotations

import importlib
import pkgutil

import veil


def all_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(veil.__path__, "veil.")]


def test_every_module_has_a_docstring_and_valid_all() -> None:
    for name in ["veil", *all_modules()]:
        module = importlib.import_module(name)
        assert module.__doc__ and module.__doc__.strip(), f"{name} has no docstring"
        for exported in getattr(module, "__all__", []):
            assert hasattr(module, exported), f"{name}.__all__ names missing {exported}"
