"""Noise sources: drawing into a buffer gives the same Gaussian as a new tensor."""

from __future__ import annotations

import math

import pytest
import torch

from veil.errors import PrivacyError
from veil.privacy import GeneratorNoise, SecureNoise


def test_generator_fill_normal_draws_what_normal_draws() -> None:
    # Same generator state, same shape: the same values, so drawing straight into
    # the DP-SGD step's buffers leaves seeded runs' noise as it was.
    for shape in (torch.Size([200, 784]), torch.Size([10]), torch.Size([3, 2, 5])):
        fresh = GeneratorNoise(torch.Generator().manual_seed(4))
        into = GeneratorNoise(torch.Generator().manual_seed(4))
        expected = fresh.normal(shape, 0.3, torch.float32)
        buffer = torch.full(shape, float("nan"))
        assert into.fill_normal(buffer, 0.3) is buffer
        assert torch.equal(buffer, expected)


@pytest.mark.parametrize("source", [GeneratorNoise(torch.Generator()), SecureNoise()])
def test_fill_normal_refuses_a_strided_buffer(source: object) -> None:
    strided = torch.zeros(6, 4).T
    with pytest.raises(PrivacyError, match="contiguous"):
        source.fill_normal(strided, 1.0)  # type: ignore[attr-defined]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_secure_fill_normal_is_gaussian(dtype: torch.dtype) -> None:
    buffer = torch.full((300, 333), float("nan"), dtype=dtype)  # odd count: 99,900
    SecureNoise().fill_normal(buffer, 0.5)
    values = buffer.double().flatten() / 0.5
    n = values.numel()
    assert bool(values.isfinite().all())
    assert float(values.mean()) == pytest.approx(0.0, abs=4 / math.sqrt(n))
    assert float(values.std()) == pytest.approx(1.0, rel=0.02)
    # Fourth moment 3 and a tail mass matching the Gaussian's (P(|z| > 2) = 4.55%).
    assert float(values.pow(4).mean()) == pytest.approx(3.0, rel=0.06)
    assert float((values.abs() > 2).double().mean()) == pytest.approx(0.0455, rel=0.1)
