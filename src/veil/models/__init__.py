"""Models: the small networks veil trains on phones.

- ``2nn``: McMahan et al. (2017)'s multilayer perceptron, 784-200-200-10 with ReLU
  (199,210 parameters).
- ``cnn``: McMahan et al. (2017)'s CNN: two 5x5 convolutions (32 and 64 channels, each
  followed by 2x2 max pooling), a 512-unit dense layer and a softmax layer
  (1,663,370 parameters).
- ``tanh-cnn``: the small tanh CNN of the DP-SGD literature (Papernot et al. 2020,
  Opacus's MNIST example): 26,010 parameters.
- ``hapt-cnn`` / ``hapt-cnn-12``: a small 1-D CNN for windows of phone motion
  sensors, ``(N, 6, 128)`` (UCI HAPT): three 5-tap convolutions (16, 32, 32 channels),
  global average pooling and a linear layer; 8,438 parameters for the 6 basic
  activities, 8,636 for all 12. Small on purpose: under user-level DP the noise grows
  with the square root of the parameter count.
- ``tuandromd-mlp``: 241 binary app features, 16 ReLU units, 2 classes (malware,
  goodware): 3,906 parameters.

Models know nothing about privacy; they are built by name with :func:`build_model`.
:func:`replace_batchnorm` makes a model fit for per-example gradients (DP-SGD) by
swapping BatchNorm, which mixes the examples of a batch, for GroupNorm, which does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

__all__ = [
    "MODELS",
    "build_model",
    "cnn",
    "hapt_cnn",
    "mlp_2nn",
    "num_parameters",
    "replace_batchnorm",
    "tanh_cnn",
    "tuandromd_mlp",
]


def mlp_2nn(
    in_features: int = 784, num_classes: int = 10, hidden: int = 200
) -> nn.Module:
    """Two hidden layers of ``hidden`` ReLU units ("2NN" in McMahan et al. 2017)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """McMahan et al. (2017)'s CNN for 28x28 images."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def tanh_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """The small tanh CNN used for DP-SGD on MNIST (26,010 parameters)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, kernel_size=8, stride=2, padding=3),
        nn.Tanh(),
        nn.MaxPool2d(2, stride=1),
        nn.Conv2d(16, 32, kernel_size=4, stride=2),
        nn.Tanh(),
        nn.MaxPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.Tanh(),
        nn.Linear(32, num_classes),
    )


def hapt_cnn(in_channels: int = 6, num_classes: int = 6) -> nn.Module:
    """A small 1-D CNN for sensor windows of shape ``(N, in_channels, length)``."""
    return nn.Sequential(
        nn.Conv1d(in_channels, 16, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(16, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(32, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def tuandromd_mlp(
    in_features: int = 241, num_classes: int = 2, hidden: int = 16
) -> nn.Module:
    """One hidden layer of ``hidden`` ReLU units over binary app features."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "2nn": mlp_2nn,
    "cnn": cnn,
    "tanh-cnn": tanh_cnn,
    "hapt-cnn": hapt_cnn,
    "hapt-cnn-12": lambda: hapt_cnn(num_classes=12),
    "tuandromd-mlp": tuandromd_mlp,
}


def build_model(name: str) -> nn.Module:
    """A freshly initialised model by name (see :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name]()


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def replace_batchnorm(model: nn.Module, num_groups: int = 32) -> nn.Module:
    """Swap every BatchNorm layer of ``model`` for a GroupNorm, in place.

    Each ``BatchNorm{1,2,3}d`` over ``C`` channels becomes ``GroupNorm(g, C)`` with
    ``g = gcd(num_groups, C)`` groups, keeping its ``eps``, whether it has an affine
    transform, and that transform's current weight and bias. GroupNorm normalises each
    example on its own, so the model then has per-example gradients.

    Args:
        model: the network to change; also returned.
        num_groups: the most groups per layer, >= 1; default 32 (Wu and He 2018).

    Returns:
        ``model`` itself (or a GroupNorm if ``model`` is itself a BatchNorm layer).
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return _group_norm(model, num_groups)
    for name, child in model.named_children():
        setattr(model, name, replace_batchnorm(child, num_groups))
    return model


def _group_norm(bn: nn.modules.batchnorm._BatchNorm, num_groups: int) -> nn.GroupNorm:
    channels = bn.num_features
    gn = nn.GroupNorm(math.gcd(num_groups, channels), channels, bn.eps, bn.affine)
    if bn.affine:
        gn.weight.data.copy_(bn.weight.data)
        gn.bias.data.copy_(bn.bias.data)
    return gn
