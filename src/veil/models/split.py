"""Split points: cutting a model into a device part and a cloud part.

Private inference (:mod:`veil.inference`) runs the first layers of a network on the
phone (the *device part*) and the rest in the cloud (the *cloud part*); only the
representation between them leaves the phone. :func:`split_model` cuts any
``nn.Sequential`` at a layer index. Two small models are built for it:

- ``split-cnn``: two 5x5 convolutions (16 and 32 channels, each followed by ReLU and
  2x2 max pooling) and a dense layer to ``features`` ReLU units on the device; two
  dense layers of ``hidden`` units and the class layer in the cloud. The cloud part
  starts at layer 9.
- ``split-mlp``: a dense layer of ``hidden`` ReLU units and one to ``features`` ReLU
  units on the device; the same cloud part, from layer 5. For tabular data.

A narrow representation (``features`` small) matters for privacy: the Laplace noise
the device adds is per element, so its total grows with the width while the bounded
signal does not. Models know nothing about privacy; the bound, nullification and noise
are :mod:`veil.inference`'s.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = [
    "SPLIT_LAYERS",
    "SPLIT_MODELS",
    "build_split_model",
    "cloud_head",
    "split_cnn",
    "split_mlp",
    "split_model",
]


def cloud_head(features: int, num_classes: int, hidden: int = 256) -> list[nn.Module]:
    """The cloud layers of both split models: two ReLU layers and the class layer."""
    return [
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    ]


def split_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    features: int = 64,
    hidden: int = 256,
) -> nn.Sequential:
    """A CNN for ``image_size`` square images; ``model[:9]`` outputs the
    ``features``-wide representation (see the module docstring)."""
    side = image_size // 4
    device = [
        nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * side * side, features),
        nn.ReLU(),
    ]
    return nn.Sequential(*device, *cloud_head(features, num_classes, hidden))


def split_mlp(
    in_features: int, num_classes: int, features: int = 32, hidden: int = 256
) -> nn.Sequential:
    """An MLP for tabular data; ``model[:5]`` outputs the ``features``-wide
    representation (see the module docstring)."""
    device = [
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, features),
        nn.ReLU(),
    ]
    return nn.Sequential(*device, *cloud_head(features, num_classes, hidden))


#: Builders by name: ``(input_shape, num_classes, features, hidden) -> model``.
SPLIT_MODELS: dict[str, Callable[[tuple[int, ...], int, int, int], nn.Sequential]] = {
    "split-cnn": lambda shape, k, f, h: split_cnn(shape[0], k, shape[-1], f, h),
    "split-mlp": lambda shape, k, f, h: split_mlp(_numel(shape), k, f, h),
}

#: Default split layer of each model: the device part is ``model[:layer]``.
SPLIT_LAYERS: dict[str, int] = {"split-cnn": 9, "split-mlp": 5}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def build_split_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    features: int = 64,
    hidden: int = 256,
) -> nn.Sequential:
    """A freshly initialised split model by name (see :data:`SPLIT_MODELS`).

    Args:
        name: ``"split-cnn"`` (input ``(C, H, H)``) or ``"split-mlp"`` (any shape,
            flattened).
        input_shape: shape of one example, without the batch dimension.
        num_classes: number of classes, >= 2.
        features: width of the representation the device sends, >= 1.
        hidden: width of the hidden layers, >= 1.
    """
    if name not in SPLIT_MODELS:
        raise ValueError(f"model must be one of {sorted(SPLIT_MODELS)}, got {name!r}")
    if name == "split-cnn" and (len(input_shape) != 3 or input_shape[1] % 4):
        raise ValueError(
            "split-cnn needs input_shape (C, H, H) with H divisible by 4, "
            f"got {input_shape}"
        )
    return SPLIT_MODELS[name](tuple(input_shape), num_classes, features, hidden)


def split_model(
    model: nn.Sequential, layer: int
) -> tuple[nn.Sequential, nn.Sequential]:
    """Cut ``model`` into ``(model[:layer], model[layer:])``, sharing its modules.

    Args:
        model: the whole network, an ``nn.Sequential``.
        layer: index of the first cloud layer, in ``1..len(model)-1``, so that both
            parts hold at least one layer.

    Returns:
        ``(device_part, cloud_part)``; ``cloud_part(device_part(x)) == model(x)``.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    if not 1 <= layer < len(model):
        raise ValueError(
            f"layer must be in 1..{len(model) - 1} so both parts are non-empty, "
            f"got {layer}"
        )
    layers = list(model)
    return nn.Sequential(*layers[:layer]), nn.Sequential(*layers[layer:])
