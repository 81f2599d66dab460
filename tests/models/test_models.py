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
