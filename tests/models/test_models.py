"""Model architectures: parameter counts from the papers and output shapes."""

from __future__ import annotations

import pytest
import torch

from veil.models import build_model, num_parameters


@pytest.mark.parametrize(
    ("name", "count"),
    [("2nn", 199_210), ("cnn", 1_663_370), ("tanh-cnn", 26_010)],
)
def test_parameter_counts(name: str, count: int) -> None:
    model = build_model(name)
    assert num_parameters(model) == count
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("resnet")


@pytest.mark.parametrize(
    ("name", "count", "shape", "classes"),
    [
        ("hapt-cnn", 8_438, (3, 6, 128), 6),
        ("hapt-cnn-12", 8_636, (3, 6, 128), 12),
        ("tuandromd-mlp", 3_906, (3, 241), 2),
    ],
)
def test_mobile_models(
    name: str, count: int, shape: tuple[int, ...], classes: int
) -> None:
    # hapt-cnn: 6*16*5+16 + 16*32*5+32 + 32*32*5+32 + 32*6+6 = 8,438;
    # tuandromd-mlp: 241*16+16 + 16*2+2 = 3,906.
    model = build_model(name)
    assert num_parameters(model) == count
    assert model(torch.zeros(shape)).shape == (3, classes)
