"""Every inference module declares its public names in ``__all__``, completely."""

from __future__ import annotations

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
