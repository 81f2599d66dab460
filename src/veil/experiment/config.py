"""The experiment config: one TOML file, validated with pydantic.

Every section and key is declared here, with its default and allowed range. An unknown
key or a bad value is a :class:`~veil.errors.ConfigError` that names the key, says what
is allowed and what was found. :func:`load_config` reads a file;
:func:`dump_config` writes the resolved config (all defaults filled in) back as TOML.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from veil.data import DATASETS
from veil.errors import ConfigError
from veil.models import MODELS

__all__ = [
    "METHOD_NAMES",
    "CentralizedConfig",
    "DataConfig",
    "ExperimentConfig",
    "FedAvgConfig",
    "LocalConfig",
    "ModelConfig",
    "StandaloneConfig",
    "dump_config",
    "load_config",
    "parse_config",
]

#: Methods ``veil run`` knows, in the order they run.
METHOD_NAMES = ("centralized", "standalone", "fedavg")

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """``[data]``: which dataset, and how it is split among clients."""

    dataset: str = "mnist"
    partition: Literal["iid", "shards", "dirichlet", "natural"] = "iid"
    num_clients: PositiveInt = 100
    alpha: PositiveFloat = 0.5
    shards_per_client: PositiveInt = 2
    data_dir: str | None = None

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"must be one of {sorted(DATASETS)}")
        return v


class ModelConfig(_Section):
    """``[model]``: the architecture, by name."""

    name: str = "2nn"

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in MODELS:
            raise ValueError(f"must be one of {sorted(MODELS)}")
        return v


class LocalConfig(_Section):
    """``[local]``: a client's SGD between two rounds (lr, E, B)."""

    lr: PositiveFloat = 0.1
    epochs: PositiveInt = 1
    batch_size: PositiveInt = 10


class FedAvgConfig(_Section):
    """``[fedavg]``: rounds and client fraction C."""

    rounds: PositiveInt = 50
    client_fraction: Annotated[float, Field(gt=0, le=1)] = 0.1
    eval_every: PositiveInt = 1


class CentralizedConfig(_Section):
    """``[centralized]``: SGD on all clients' data pooled (the upper baseline)."""

    epochs: PositiveInt = 5
    lr: PositiveFloat | None = None
    batch_size: PositiveInt | None = None


class StandaloneConfig(_Section):
    """``[standalone]``: each client trains alone on its own data (the lower baseline).

    ``max_clients`` caps how many clients are trained (a random subset, for speed);
    ``None`` trains all of them.
    """

    epochs: PositiveInt = 5
    max_clients: PositiveInt | None = None


class ExperimentConfig(_Section):
    """The whole experiment. Methods run in the order of :data:`METHOD_NAMES`."""

    name: str = "experiment"
    seed: int = 0
    methods: list[str] = Field(default_factory=lambda: ["fedavg"], min_length=1)
    target_accuracy: Annotated[float, Field(gt=0, le=1)] | None = None
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    local: LocalConfig = LocalConfig()
    fedavg: FedAvgConfig = FedAvgConfig()
    centralized: CentralizedConfig = CentralizedConfig()
    standalone: StandaloneConfig = StandaloneConfig()

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHOD_NAMES]
        if unknown:
            raise ValueError(f"must be drawn from {list(METHOD_NAMES)}")
        if len(set(v)) != len(v):
            raise ValueError("must not repeat a method")
        return v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError("must be a non-empty name without '/' or a leading '.'")
        return v


def _section_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return sorted(model.model_fields)


def _explain(exc: ValidationError) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _section_keys(loc[:-1])
            lines.append(f"unknown key '{key}'; allowed keys here: {allowed}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"'{key}': {msg}; found {err['input']!r}")
    return ConfigError("invalid config:\n  " + "\n  ".join(lines))


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a config given as a dict (as read from TOML)."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise _explain(exc) from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(raw)


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as TOML (``None`` values are left out)."""
    return tomli_w.dumps(config.model_dump(exclude_none=True))
