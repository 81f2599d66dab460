"""A trained split model on disk: safetensors for the parts, JSON for the rest.

``veil infer train`` writes, in its run directory::

    split-model.json          what the parts are (format ``veil.split-model/1``)
    device.safetensors        the frozen device part (without its bound layer)
    cloud-NAME.safetensors    each cloud part: ``plain``, ``noisy-eps<E>``, ...

and ``veil infer serve``, ``export`` and ``query`` read them back with
:func:`load_split`. The JSON names the model builder, its widths, the split layer, the
input shape, the perturbation (bound, nullification rate, deployed epsilon) and which
cloud part is deployed, so a part is rebuilt and its tensors loaded strictly (every
name and shape must match). Nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from veil.errors import ConfigError
from veil.inference.perturb import L1Bound, Perturbation
from veil.models.split import build_split_model, split_model

__all__ = [
    "SPLIT_FORMAT",
    "LoadedSplit",
    "SplitSpec",
    "load_split",
    "read_spec",
    "save_split",
]

SPLIT_FORMAT = "veil.split-model/1"
_META = "split-model.json"


@dataclass(frozen=True)
class SplitSpec:
    """Everything needed to rebuild a split model and its perturbation.

    Attributes:
        model: builder name (``split-cnn`` or ``split-mlp``).
        input_shape: shape of one input, without the batch dimension.
        num_classes: number of classes.
        features: width ``d`` of the representation.
        hidden: width of the hidden layers.
        split_layer: index of the first cloud layer.
        bound, nullification_rate, epsilon: the deployed :class:`Perturbation`.
        dataset: name of the dataset the parts were trained on.
        clouds: cloud part name -> the per-query epsilon it was noisily trained at,
            or ``None`` for the plainly trained one.
        deployed: the cloud part ``veil infer serve`` serves by default.
    """

    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    features: int
    hidden: int
    split_layer: int
    bound: float
    nullification_rate: float
    epsilon: float
    dataset: str
    clouds: dict[str, float | None] = field(default_factory=dict)
    deployed: str = "plain"

    def perturbation(self, epsilon: float | None = None) -> Perturbation:
        """The deployed perturbation, or the same at another per-query epsilon."""
        eps = self.epsilon if epsilon is None else epsilon
        return Perturbation(self.bound, self.nullification_rate, eps)

    def build(self) -> tuple[nn.Sequential, nn.Sequential]:
        """A fresh ``(device part ending in L1Bound, cloud part)``."""
        model = build_split_model(
            self.model, self.input_shape, self.num_classes, self.features, self.hidden
        )
        device, cloud = split_model(model, self.split_layer)
        return nn.Sequential(device, L1Bound(self.bound)), cloud


@dataclass
class LoadedSplit:
    """Parts read back by :func:`load_split`."""

    spec: SplitSpec
    device_part: nn.Sequential
    clouds: dict[str, nn.Sequential]


def save_split(
    folder: Path,
    spec: SplitSpec,
    device_part: nn.Sequential,
    clouds: dict[str, nn.Sequential],
) -> None:
    """Write the parts and ``split-model.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(device_part[0]), folder / "device.safetensors")
    for name, cloud in clouds.items():
        save_file(_tensors(cloud), folder / f"cloud-{name}.safetensors")
    meta = {"format": SPLIT_FORMAT, **asdict(spec)}
    (folder / _META).write_text(json.dumps(meta, indent=2) + "\n")


def _tensors(module: nn.Module) -> dict[str, Any]:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def load_split(folder: Path, clouds: list[str] | None = None) -> LoadedSplit:
    """Rebuild the parts written by :func:`save_split`.

    Args:
        folder: the run directory of ``veil infer train``.
        clouds: the cloud parts to load (default: all).

    Raises:
        ConfigError: the folder is not such a run directory, or a file does not
            match the spec (wrong names or shapes).
    """
    spec = read_spec(folder)
    device, _ = spec.build()
    _load_into(device[0], folder / "device.safetensors")
    device.eval().requires_grad_(False)
    loaded = {}
    for name in clouds if clouds is not None else list(spec.clouds):
        if name not in spec.clouds:
            raise ConfigError(
                f"cloud part must be one of {sorted(spec.clouds)}, got {name!r}"
            )
        _, cloud = spec.build()
        _load_into(cloud, folder / f"cloud-{name}.safetensors")
        loaded[name] = cloud.eval().requires_grad_(False)
    return LoadedSplit(spec, device, loaded)


def read_spec(folder: Path) -> SplitSpec:
    """The :class:`SplitSpec` in ``folder/split-model.json``."""
    path = folder / _META
    if not path.exists():
        raise ConfigError(
            f"{folder} holds no split model ({_META} missing): give the run "
            "directory written by `veil infer train`"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    if meta.pop("format", None) != SPLIT_FORMAT:
        raise ConfigError(f"{path}: format must be {SPLIT_FORMAT!r}")
    try:
        meta["input_shape"] = tuple(meta["input_shape"])
        return SplitSpec(**meta)
    except (TypeError, KeyError) as exc:
        raise ConfigError(f"{path} does not describe a split model ({exc})") from None


def _load_into(module: nn.Module, path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"{path} is missing")
    try:
        module.load_state_dict(load_file(path), strict=True)
    except (RuntimeError, OSError) as exc:
        raise ConfigError(f"{path} does not fit the split model ({exc})") from None
