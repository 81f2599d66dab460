"""The public surface: every module says what it is for, and __all__ is truthful."""

from __future__ import annotations

import importlib
import inspect
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


def test_every_public_function_and_class_is_in_all() -> None:
    """Contract for every public module (private ``_name`` modules are the package's
    own business): what it defines without a leading underscore is in ``__all__``."""
    public = [
        m for m in all_modules() if not any(p.startswith("_") for p in m.split("."))
    ]
    incomplete = {}
    for name in ["veil", *public]:
        module = importlib.import_module(name)
        defined = {
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and (inspect.isfunction(obj) or inspect.isclass(obj))
            and obj.__module__ == name
        }
        missing = defined - set(getattr(module, "__all__", []))
        if missing:
            incomplete[name] = sorted(missing)
    assert not incomplete, incomplete
