"""The exceptions veil raises at its boundaries.

Every error says what was wrong, what is allowed and what was found, so that a user can
fix the input without reading veil's code. The CLI maps them to exit codes.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "UpdateError", "VeilError"]


class VeilError(Exception):
    """Base class of every error veil raises on purpose."""


class DataError(VeilError):
    """A dataset is missing, corrupt, or cannot be split as asked."""


class ConfigError(VeilError):
    """An experiment config has an unknown key or a bad value."""


class UpdateError(VeilError):
    """A client update was refused (wrong names or shapes, NaN, zero weight)."""
