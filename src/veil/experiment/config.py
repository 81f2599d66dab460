"""The experiment config: one TOML file, validated with pydantic.

Every section and key is declared here, with its default and allowed range. An unknown
key or a bad value is a :class:`~veil.errors.ConfigError` that names the key, says what
is allowed and what was found. :func:`load_config` reads a file;
:func:`dump_config` writes the resolved config (all defaults filled in) back as TOML.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from veil.data import DATASETS
from veil.errors import ConfigError
from veil.models import MODELS

__all__ = [
    "METHOD_NAMES",
    "CentralDPConfig",
    "CentralizedConfig",
    "DPConfig",
    "DataConfig",
    "ExperimentConfig",
    "FedAvgConfig",
    "LocalConfig",
    "ModelConfig",
    "SecAggConfig",
    "StandaloneConfig",
    "dump_config",
    "load_config",
    "parse_config",
]

#: Methods ``veil run`` knows, in the order they run.
METHOD_NAMES = ("centralized", "central-dp", "standalone", "fedavg")

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


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
    """``[fedavg]``: rounds and client fraction C.

    ``local_dp = true`` makes every client train with DP-SGD (settings in ``[dp]``,
    expected batch size ``local.batch_size``): each client keeps its own privacy
    ledger and budget, and the guarantee protects one example of one client.
    """

    rounds: PositiveInt = 50
    client_fraction: Annotated[float, Field(gt=0, le=1)] = 0.1
    eval_every: PositiveInt = 1
    local_dp: bool = False
    secure_aggregation: bool = False


class SecAggConfig(_Section):
    """``[secagg]``: secure aggregation of FedAvg's updates
    (``fedavg.secure_aggregation = true``; see docs/secagg.md).

    ``threshold`` is the fraction of each client's share holders (itself and its
    neighbours) needed to reconstruct its secrets; t is always more than half.
    ``neighbours`` is ``"full"`` (Bonawitz et al. 2017), ``"auto"`` (SecAgg+, k from
    the number of clients and ``dropout_rate``) or an even k. ``clip_range`` bounds
    every coordinate of an update; ``bits`` is the modulus width. ``dropout_rate``
    makes each chosen client drop out, in simulation, with that probability at a
    step drawn uniformly. ``max_examples`` is the public bound on a client's example
    count used for weighting (default: the largest client).
    """

    threshold: Annotated[float, Field(ge=0.5, le=1)] = 0.5
    neighbours: Literal["full", "auto"] | Annotated[int, Field(ge=2)] = "full"
    bits: Annotated[int, Field(ge=2, le=64)] = 32
    clip_range: PositiveFloat = 1.0
    dropout_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0
    max_examples: PositiveInt | None = None

    @field_validator("neighbours")
    @classmethod
    def _even(cls, v: str | int) -> str | int:
        if isinstance(v, int) and v % 2:
            raise ValueError("must be 'full', 'auto' or an even number >= 2")
        return v


class DPConfig(_Section):
    """``[dp]``: DP-SGD settings for ``central-dp`` and for ``fedavg.local_dp``.

    ``epsilon`` and ``delta`` are the budget, enforced: training stops before the
    step that would exceed it. Without ``noise_multiplier`` the noise is calibrated
    so that the planned training spends at most ``epsilon`` (for FedAvg clients, as
    if every client took part in every round, the worst case).
    """

    clipping_norm: PositiveFloat = 1.0
    noise_multiplier: NonNegativeFloat | None = None
    epsilon: PositiveFloat | None = None
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    accountant: Literal["pld", "rdp"] = "pld"
    relation: Literal["add_or_remove_one", "replace_one"] = "add_or_remove_one"
    secure_noise: bool = False
    engine: Literal["auto", "ghost", "functional"] = "auto"
    max_physical_batch: PositiveInt = 256

    @model_validator(mode="after")
    def _noise_or_budget(self) -> DPConfig:
        if self.noise_multiplier is None and self.epsilon is None:
            raise ValueError(
                "give noise_multiplier, epsilon (the budget, from which the noise is "
                "calibrated) or both"
            )
        return self


class CentralDPConfig(_Section):
    """``[central_dp]``: DP-SGD on all clients' data pooled (Abadi et al. 2016).

    ``final_lr``, when given, decays the learning rate from ``lr`` along a cosine to
    ``final_lr`` over the epochs (post-processing: no effect on the accounting).
    """

    epochs: PositiveInt = 10
    expected_batch_size: PositiveInt = 256
    lr: PositiveFloat = 1.0
    final_lr: PositiveFloat | None = None
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0


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
    dp: DPConfig | None = None
    central_dp: CentralDPConfig = CentralDPConfig()
    secagg: SecAggConfig = SecAggConfig()

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHOD_NAMES]
        if unknown:
            raise ValueError(f"must be drawn from {list(METHOD_NAMES)}")
        if len(set(v)) != len(v):
            raise ValueError("must not repeat a method")
        return v

    @model_validator(mode="after")
    def _dp_settings_present(self) -> ExperimentConfig:
        needs_dp = "central-dp" in self.methods or (
            "fedavg" in self.methods and self.fedavg.local_dp
        )
        if needs_dp and self.dp is None:
            raise ValueError(
                "central-dp and fedavg.local_dp need a [dp] section (clipping_norm, "
                "noise_multiplier and/or epsilon, delta)"
            )
        return self

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
        # An optional section (``DPConfig | None``) is looked up through its union.
        options = [ann, *get_args(ann)]
        sections = [
            a for a in options if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not sections:
            break
        model = sections[0]
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
            found = "" if not loc else f"; found {err['input']!r}"
            lines.append(f"'{key}': {msg}{found}")
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
