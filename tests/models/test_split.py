"""Split points: the two parts compose to the whole model."""

from __future__ import annotations

import pytest
import torch

from veil.models import cnn, mlp_2nn
from veil.models.split import SPLIT_LAYERS, build_split_model, split_model


@pytest.mark.parametrize(
    ("name", "shape"), [("split-cnn", (1, 28, 28)), ("split-mlp", (30,))]
)
def test_parts_compose_to_the_model(name: str, shape: tuple[int, ...]) -> None:
    model = build_split_model(name, shape, 10, features=12, hidden=32)
    device, cloud = split_model(model, SPLIT_LAYERS[name])
    x = torch.randn(3, *shape)
    r = device(x)
    assert r.shape == (3, 12)
    assert torch.equal(cloud(r), model(x))
    # the parts share the model's modules
    assert device[0] is model[0]


@pytest.mark.parametrize("factory", [cnn, mlp_2nn])
def test_any_sequential_splits(factory) -> None:  # type: ignore[no-untyped-def]
    model = factory()
    x = torch.randn(2, 1, 28, 28)
    for layer in range(1, len(model)):
        device, cloud = split_model(model, layer)
        assert torch.allclose(cloud(device(x)), model(x))


def test_bad_split_is_refused() -> None:
    model = mlp_2nn()
    for layer in (0, len(model)):
        with pytest.raises(ValueError, match="layer must be"):
            split_model(model, layer)
    with pytest.raises(ValueError, match="split-cnn needs"):
        build_split_model("split-cnn", (30,), 2)
    with pytest.raises(ValueError, match="model must be"):
        build_split_model("resnet", (1, 28, 28), 10)
