"""The config of ``veil infer train``: one TOML file, validated with pydantic.

Every key is optional; an unknown key or a bad value is a
:class:`~veil.errors.ConfigError` naming the key, what is allowed and what was found.

```toml
name = "mnist-arden"
seed = 0

[data]
dataset = "mnist"          # any bundled dataset (veil.data.DATASETS)
max_train = 60000          # optional caps, for quick runs
max_test = 10000

[model]
name = "split-cnn"         # split-cnn (images) | split-mlp (tabular)
features = 16              # width of the representation the device sends
hidden = 256
split_layer = 9            # default: the model's own split point

[pretrain]                 # device + cloud part together, no noise (public data)
epochs = 3
lr = 0.001
batch_size = 128

[perturbation]             # what a device applies to every query
bound = 16.0               # L1 norm bound B (privacy does not depend on it)
nullification_rate = 0.1   # mu
epsilon = 5.0              # per-query epsilon of the deployed cloud part

[noisy_training]           # the cloud part on perturbed representations
epochs = 3
lr = 0.001
batch_size = 128
augment = "auto"           # auto | affine (images) | swap (tabular) | none
augmented_fraction = 0.5   # the mix: share of augmented inputs per batch
augmented_copies = 4       # augmented versions made of each input (once)
lr_schedule = "constant"   # constant | cosine (decays to 0 over all steps)
rotation = 15.0            # affine: degrees
shift = 0.1                # affine: fraction of the image side
swap_rate = 0.1            # swap: probability per feature

[report]
epsilons = [1.0, 2.0, 5.0, 10.0, 20.0]   # each gets a noisily trained cloud part
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

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
from veil.models.split import SPLIT_MODELS

__all__ = [
    "InferenceConfig",
    "InferenceDataConfig",
    "NoisyTrainingConfig",
    "PerturbationConfig",
    "PretrainConfig",
    "ReportConfig",
    "SplitModelConfig",
    "dump_inference_config",
    "load_inference_config",
    "parse_inference_config",
]


_Section = Section


class InferenceDataConfig(_Section):
    """``[data]``: the dataset, and optional caps on its splits (first examples)."""

    dataset: str = "mnist"
    data_dir: str | None = None
    max_train: PositiveInt | None = None
    max_test: PositiveInt | None = None

    _known_dataset = field_validator("dataset")(one_of(DATASETS))


class SplitModelConfig(_Section):
    """``[model]``: the split model, its widths and split layer."""

    name: str = "split-cnn"
    features: PositiveInt = 16
    hidden: PositiveInt = 256
    split_layer: PositiveInt | None = None

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in SPLIT_MODELS:
            raise ValueError(f"must be one of {sorted(SPLIT_MODELS)}")
        return v


class PretrainConfig(_Section):
    """``[pretrain]``: both parts together on public data, no noise (Adam)."""

    epochs: PositiveInt = 3
    lr: PositiveFloat = 1e-3
    batch_size: PositiveInt = 128


class PerturbationConfig(_Section):
    """``[perturbation]``: the device's bound, nullification rate and epsilon.

    The privacy of a query does not depend on ``bound`` (the noise scales with it);
    it sets the scale of the cloud part's inputs, which trains best near 1 per
    element: about the representation's width.
    """

    bound: PositiveFloat = 16.0
    nullification_rate: Annotated[float, Field(ge=0, lt=1)] = 0.1
    epsilon: PositiveFloat = 5.0


class NoisyTrainingConfig(_Section):
    """``[noisy_training]``: the cloud part on perturbed representations."""

    epochs: PositiveInt = 3
    lr: PositiveFloat = 1e-3
    batch_size: PositiveInt = 128
    augment: Literal["auto", "affine", "swap", "none"] = "auto"
    augmented_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5
    augmented_copies: PositiveInt = 4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    rotation: Annotated[float, Field(ge=0, le=180)] = 15.0
    shift: Annotated[float, Field(ge=0, lt=1)] = 0.1
    swap_rate: Annotated[float, Field(ge=0, le=1)] = 0.1


class ReportConfig(_Section):
    """``[report]``: the per-query epsilons to measure accuracy at."""

    epsilons: list[PositiveFloat] = Field(
        default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 20.0], min_length=1
    )


class InferenceConfig(_Section):
    """The whole ``veil infer train`` config (see the module docstring)."""

    name: str = "inference"
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    data: InferenceDataConfig = InferenceDataConfig()
    model: SplitModelConfig = SplitModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    perturbation: PerturbationConfig = PerturbationConfig()
    noisy_training: NoisyTrainingConfig = NoisyTrainingConfig()
    report: ReportConfig = ReportConfig()

    _safe_name = field_validator("name")(check_name)

    def epsilons(self) -> list[float]:
        """The report's epsilons and the deployed one, sorted, without repeats."""
        return sorted({*self.report.epsilons, self.perturbation.epsilon})


def parse_inference_config(raw: dict[str, Any]) -> InferenceConfig:
    """Validate a config given as a dict (as read from TOML)."""
    return validate(InferenceConfig, raw)


def load_inference_config(path: str | Path) -> InferenceConfig:
    """Read and validate a TOML config file."""
    return parse_inference_config(read_toml(path))


def dump_inference_config(config: InferenceConfig) -> str:
    """The resolved config as TOML (``None`` values are left out)."""
    return dump_toml(config)
