"""Every attacks module declares its public names in ``__all__``, completely."""

from __future__ import annotations

import importlib
from pathlib import Path

MODULES = [
    "veil.attacks",
    "veil.attacks.audit",
    "veil.attacks.gradient_inversion",
    "veil.attacks.membership",
    "veil.attacks.metrics",
    "veil.attacks.releases",
    "veil.attacks.representation",
    "veil.attacks.run",
    "veil.attacks.views",
    "veil.commands.attack",
]


def test_package_face_exports_every_module_api() -> None:
    package = importlib.import_module("veil.attacks")
    for name in MODULES[1:-1]:
        if name.endswith(".run"):
            continue  # reached through `veil attack`
        module = importlib.import_module(name)
        assert set(module.__all__) <= set(package.__all__), name


def test_core_does_not_import_attacks(repo_root: Path) -> None:
    """Only the attacks package and its command import veil.attacks."""
    src = repo_root / "src" / "veil"
    allowed = {src / "commands" / "attack.py"}
    for path in src.rglob("*.py"):
        if "attacks" in path.relative_to(src).parts or path in allowed:
            continue
        text = path.read_text()
        assert "from veil.attacks" not in text and "import veil.attacks" not in text
