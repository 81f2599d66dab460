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

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from veil._toml import (
    PositiveFloat,
    PositiveInt,
    Section,
    check_name,
    dump_toml,
    one_of,
    read_toml,
    validate,
)
from veil.data import DATASETS
from veil.models import MODELS

__all__ = [
    "METHOD_NAMES",
    "CentralDPConfig",
    "CentralizedConfig",
    "DPConfig",
    "DPFedAvgConfig",
    "DSSGDConfig",
    "DSSGDPrivacyConfig",
    "DataConfig",
    "ExperimentConfig",
    "FedAvgConfig",
    "LocalConfig",
    "ModelConfig",
    "NetworkConfig",
    "RayConfig",
    "SecAggConfig",
    "StandaloneConfig",
    "dump_config",
    "load_config",
    "parse_config",
    "with_ray_address",
]

#: Methods ``veil run`` knows, in the order they run.
METHOD_NAMES = (
    "centralized",
    "central-dp",
    "standalone",
    "fedavg",
    "dp-fedavg",
    "dssgd",
)

NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


_Section = Section


class DataConfig(_Section):
    """``[data]``: which dataset, and how it is split among clients."""

    dataset: str = "mnist"
    partition: Literal["iid", "shards", "dirichlet", "natural"] = "iid"
    num_clients: PositiveInt = 100
    alpha: PositiveFloat = 0.5
    shards_per_client: PositiveInt = 2
    data_dir: str | None = None

    _known_dataset = field_validator("dataset")(one_of(DATASETS))


class ModelConfig(_Section):
    """``[model]``: the architecture, by name."""

    name: str = "2nn"

    _known_model = field_validator("name")(one_of(MODELS))


class LocalConfig(_Section):
    """``[local]``: a client's SGD between two rounds (lr, E, B)."""

    lr: PositiveFloat = 0.1
    epochs: PositiveInt = 1
    batch_size: PositiveInt = 10


class FedAvgConfig(_Section):
    """``[fedavg]``: rounds and client fraction C.

    ``server_lr`` and ``server_momentum`` (default 1 and 0, plain FedAvg) make the
    server step on the mean update with momentum (FedAvgM), as ``[dp_fedavg]`` can.

    ``local_dp = true`` makes every client train with DP-SGD (settings in ``[dp]``,
    expected batch size ``local.batch_size``): each client keeps its own privacy
    ledger and budget, and the guarantee protects one example of one client.
    """

    rounds: PositiveInt = 50
    client_fraction: Annotated[float, Field(gt=0, le=1)] = 0.1
    eval_every: PositiveInt = 1
    local_dp: bool = False
    secure_aggregation: bool = False
    server_lr: PositiveFloat = 1.0
    server_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0


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
    count used for weighting (default: the largest client). ``step_timeout`` is
    how many seconds each of the share keys, masked input and unmasking steps stays
    open in the network runtime (default: ``network.round_timeout``).
    """

    threshold: Annotated[float, Field(ge=0.5, le=1)] = 0.5
    neighbours: Literal["full", "auto"] | Annotated[int, Field(ge=2)] = "full"
    bits: Annotated[int, Field(ge=2, le=64)] = 32
    clip_range: PositiveFloat = 1.0
    dropout_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0
    max_examples: PositiveInt | None = None
    step_timeout: PositiveFloat | None = None

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


class DPFedAvgConfig(_Section):
    """``[dp_fedavg]``: DP-FedAvg with user-level DP (McMahan et al. 2018).

    Each round samples clients (``sampling``: ``poisson`` with probability
    ``sample_rate`` each, or ``fixed``: exactly ``sample_rate * num_clients``),
    clips each update to ``clipping_norm``, adds Gaussian noise of std
    ``noise_multiplier * clipping_norm`` to the sum once (``placement``: by the
    server, ``central``, or split among the clients, ``distributed``) and divides by
    the expected number of clients. ``epsilon`` is the user-level budget at
    ``delta`` (default ``0.1 / num_clients``; must be below ``1 / num_clients``);
    without ``noise_multiplier`` the noise is calibrated so ``rounds`` rounds spend
    at most ``epsilon``. ``adaptive_clipping`` makes the clipping norm follow the
    ``target_quantile`` of update norms (Andrew et al. 2021) with a count noised by
    ``count_noise_multiplier`` (default: expected clients / 20, at least the noise
    multiplier); its cost is inside
    ``noise_multiplier``. ``secure_aggregation`` (distributed placement only) sums
    the noised updates with secure aggregation, using the ``[secagg]`` settings.
    Poisson sampling is accounted with ``accountant`` (add/remove one client);
    fixed-size sampling always with ``rdp`` under ``replace_one`` (the only
    analysis available for it).
    """

    rounds: PositiveInt = 100
    sampling: Literal["poisson", "fixed"] = "poisson"
    sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.1
    placement: Literal["central", "distributed"] = "central"
    clipping_norm: PositiveFloat = 1.0
    noise_multiplier: NonNegativeFloat | None = None
    epsilon: PositiveFloat | None = None
    delta: Annotated[float, Field(gt=0, lt=1)] | None = None
    accountant: Literal["pld", "rdp"] = "pld"
    adaptive_clipping: bool = False
    target_quantile: Annotated[float, Field(gt=0, lt=1)] = 0.5
    clipping_lr: PositiveFloat = 0.2
    count_noise_multiplier: PositiveFloat | None = None
    server_lr: PositiveFloat = 1.0
    server_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    eval_every: PositiveInt = 1
    secure_noise: bool = False
    secure_aggregation: bool = False

    @model_validator(mode="after")
    def _noise_or_budget(self) -> DPFedAvgConfig:
        if self.noise_multiplier is None and self.epsilon is None:
            raise ValueError(
                "give noise_multiplier, epsilon (the user-level budget, from which "
                "the noise is calibrated) or both"
            )
        if self.secure_aggregation and self.placement != "distributed":
            raise ValueError(
                "secure_aggregation needs placement = 'distributed' (the clients "
                f"add the noise before masking), got {self.placement!r}"
            )
        return self


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


class DSSGDPrivacyConfig(_Section):
    """``[dssgd.dp]``: differentially private uploads (Shokri & Shmatikov 2015).

    ``epsilon_per_parameter`` is the paper's budget per uploaded parameter: one
    upload of ``c`` parameters spends ``c`` times it, at every upload. The report
    states each client's total, from its ledger (``accountant`` at ``delta``) and
    as the plain sum of pure epsilons. ``budget_epsilon``, when given, is enforced
    per client (at ``delta``): a client whose next upload could exceed it uploads
    nothing more.
    """

    epsilon_per_parameter: PositiveFloat
    selection_share: Annotated[float, Field(gt=0, lt=1)] = 8 / 9
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    accountant: Literal["rdp", "pld"] = "rdp"
    budget_epsilon: PositiveFloat | None = None
    secure_noise: bool = False


class DSSGDConfig(_Section):
    """``[dssgd]``: distributed selective SGD with a parameter server.

    A round gives every client one turn (``order``: round_robin, random, or async,
    where a round's turns run concurrently on ``workers`` threads). A turn trains
    ``local.epochs`` epochs, or ``local_batches`` mini-batches when given.
    ``upload_fraction`` (θu) may be a list: one run per value, side by side in the
    report. ``threshold`` is τ, ``bound`` is γ (required with ``[dssgd.dp]``).
    ``residual = true`` makes each client keep what it did not upload and add it to
    its next turn's change (error feedback; not in the original algorithm; not with
    ``[dssgd.dp]``).
    """

    rounds: PositiveInt = 10
    upload_fraction: (
        Annotated[float, Field(gt=0, le=1)]
        | Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)]
    ) = 0.1
    download_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    selection: Literal["largest", "threshold"] = "largest"
    threshold: NonNegativeFloat = 0.0
    bound: PositiveFloat | None = None
    order: Literal["round_robin", "random", "async"] = "round_robin"
    workers: PositiveInt = 2
    local_batches: PositiveInt | None = None
    eval_every: PositiveInt = 1
    residual: bool = False
    dp: DSSGDPrivacyConfig | None = None

    @model_validator(mode="after")
    def _dp_needs_threshold_and_bound(self) -> DSSGDConfig:
        if self.dp is not None and self.residual:
            raise ValueError(
                "residual must be false with [dssgd.dp]: the privacy analysis of a "
                "DP upload assumes it depends on the turn's own change only"
            )
        if self.dp is not None and (
            self.selection != "threshold" or self.bound is None
        ):
            raise ValueError(
                "[dssgd.dp] needs selection = 'threshold' (choosing the largest "
                "values is not private) and a bound (γ)"
            )
        return self

    @property
    def upload_fractions(self) -> list[float]:
        """θu as a list (one entry per run)."""
        u = self.upload_fraction
        return list(u) if isinstance(u, list) else [u]


class RayConfig(_Section):
    """``[ray]``: the Ray runtime (``runtime = "ray"``).

    ``address`` joins an existing cluster (``"auto"``, ``"ray://host:10001"``);
    without it veil starts a local Ray with ``num_cpus`` CPUs (default: all).
    Each client task reserves ``cpus_per_client`` CPUs (a fraction packs several
    clients per CPU) and, when set, ``memory_per_client_mb`` MiB of memory.
    """

    address: str | None = None
    num_cpus: PositiveInt | None = None
    cpus_per_client: PositiveFloat = 1.0
    memory_per_client_mb: PositiveInt | None = None


class NetworkConfig(_Section):
    """``[network]``: the network runtime (``runtime = "network"``, ``veil serve``).

    A round stays open ``round_timeout`` seconds; with at least ``min_results``
    results it is aggregated, otherwise it fails and the next one starts
    (``on_failed_round = "next"``) or the server stops (``"stop"``). Uploads are
    refused above ``max_update_norm`` (default: the clipping norm for DP-FedAvg
    with central noise, else no bound), above ``max_body_mb`` MiB (default: the
    model's size plus 64 KiB) or reporting more than ``max_examples`` examples.
    ``devices`` is the number of device processes ``runtime = "network"`` starts
    on 127.0.0.1, sharing the clients between them. See docs/network.md.
    """

    round_timeout: PositiveFloat = 60.0
    min_results: PositiveInt = 1
    on_failed_round: Literal["next", "stop"] = "next"
    max_update_norm: PositiveFloat | None = None
    max_body_mb: PositiveFloat | None = None
    max_examples: PositiveInt | None = None
    devices: PositiveInt = 4


class ExperimentConfig(_Section):
    """The whole experiment. Methods run in the order of :data:`METHOD_NAMES`."""

    name: str = "experiment"
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    methods: list[str] = Field(default_factory=lambda: ["fedavg"], min_length=1)
    target_accuracy: Annotated[float, Field(gt=0, le=1)] | None = None
    runtime: Literal["simulation", "ray", "network"] = "simulation"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    local: LocalConfig = LocalConfig()
    fedavg: FedAvgConfig = FedAvgConfig()
    centralized: CentralizedConfig = CentralizedConfig()
    standalone: StandaloneConfig = StandaloneConfig()
    dp: DPConfig | None = None
    central_dp: CentralDPConfig = CentralDPConfig()
    dp_fedavg: DPFedAvgConfig | None = None
    secagg: SecAggConfig = SecAggConfig()
    dssgd: DSSGDConfig = DSSGDConfig()
    ray: RayConfig = RayConfig()
    network: NetworkConfig = NetworkConfig()

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

    @model_validator(mode="after")
    def _dp_fedavg_present(self) -> ExperimentConfig:
        if "dp-fedavg" in self.methods and self.dp_fedavg is None:
            raise ValueError(
                "dp-fedavg needs a [dp_fedavg] section (sample_rate, clipping_norm, "
                "noise_multiplier and/or epsilon)"
            )
        return self

    @model_validator(mode="after")
    def _async_dssgd_in_simulation(self) -> ExperimentConfig:
        if (
            "dssgd" in self.methods
            and self.dssgd.order == "async"
            and self.runtime == "ray"
        ):
            raise ValueError(
                "dssgd.order 'async' runs only with runtime = 'simulation' or "
                "'network' (its turns interleave differently in every run, so Ray "
                "could not reproduce it); choose order = 'round_robin' or 'random'"
            )
        return self

    _safe_name = field_validator("name")(check_name)


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a config given as a dict (as read from TOML)."""
    return validate(ExperimentConfig, raw)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a TOML config file."""
    return parse_config(read_toml(path))


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as TOML (``None`` values are left out)."""
    return dump_toml(config)


def with_ray_address(config: ExperimentConfig, address: str) -> ExperimentConfig:
    """``config`` run on the existing Ray cluster at ``address`` (``"auto"``,
    ``"ray://host:10001"``): ``runtime = "ray"`` and ``[ray] address``, validated
    again as a whole (the asynchronous DSSGD order, say, is refused on Ray)."""
    raw = tomllib.loads(dump_config(config))
    raw["runtime"] = "ray"
    raw.setdefault("ray", {})["address"] = address
    return parse_config(raw)
