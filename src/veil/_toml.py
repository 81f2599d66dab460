"""What every veil config file shares: reading TOML, validating it with pydantic,
and explaining what was wrong.

``veil run`` (:mod:`veil.experiment.config`) and ``veil infer train``
(:mod:`veil.inference.config`) declare their own sections; both read, validate and
report errors here, so a mistake reads the same whichever command it was made for:
the key, what is allowed, what was found.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from veil.errors import ConfigError

__all__ = [
    "PositiveFloat",
    "PositiveInt",
    "Section",
    "check_name",
    "dump_toml",
    "one_of",
    "read_toml",
    "validate",
]

Model = TypeVar("Model", bound=BaseModel)

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field typed ``annotation`` means to take ``true`` / ``false``."""
    if annotation is bool or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    if origin is None:
        return False
    return any(_accepts_bool(a) for a in get_args(annotation))


class Section(BaseModel):
    """A config section: unknown keys are refused and values cannot change.

    A TOML ``true`` / ``false`` is refused where a number is expected (pydantic
    would read ``rounds = true`` as one round).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if (
            isinstance(value, bool)
            and field is not None
            and not _accepts_bool(field.annotation)
        ):
            raise ValueError("must be a number or a name here, not true or false")
        return value


def check_name(v: str) -> str:
    """A run name usable as a folder name: non-empty, no '/', no leading '.'."""
    if not v or any(c in v for c in "/\\") or v.startswith("."):
        raise ValueError("must be a non-empty name without '/' or a leading '.'")
    return v


def one_of(choices: Mapping[str, object]) -> Callable[[str], str]:
    """A validator accepting the names in ``choices`` (a registry such as
    ``DATASETS``, looked up when a config is validated, so later additions count)."""

    def check(v: str) -> str:
        if v not in choices:
            raise ValueError(f"must be one of {sorted(choices)}")
        return v

    return check


def _section_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model = root
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        # An optional section (``DPConfig | None``) is looked up through its union.
        options = [ann, *get_args(ann)]
        sections = [
            a for a in options if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not sections:
            break
        model = sections[0]
    return sorted(model.model_fields)


def _explain(exc: ValidationError, root: type[BaseModel]) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _section_keys(root, loc[:-1])
            lines.append(f"unknown key '{key}'; allowed keys here: {allowed}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            found = "" if not loc else f"; found {err['input']!r}"
            lines.append(f"'{key}': {msg}{found}")
    return ConfigError("invalid config:\n  " + "\n  ".join(lines))


def validate(model: type[Model], raw: dict[str, Any]) -> Model:
    """``raw`` (as read from TOML) validated as ``model``.

    Raises:
        ConfigError: naming every bad key, what is allowed and what was found.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _explain(exc, model) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; a missing or malformed file is a
    :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give a TOML config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (UTF-8 TOML expected)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def dump_toml(config: BaseModel) -> str:
    """A resolved config as TOML (``None`` values are left out)."""
    return tomli_w.dumps(config.model_dump(exclude_none=True))
