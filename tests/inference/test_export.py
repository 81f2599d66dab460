"""ONNX export of the device part: onnxruntime equals PyTorch with noise off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from veil.inference import L1Bound, export_device, onnx_outputs
from veil.models.split import SPLIT_LAYERS, build_split_model, split_model


@pytest.mark.parametrize(
    ("name", "shape", "bound"),
    [("split-cnn", (1, 28, 28), 16.0), ("split-mlp", (30,), 0.5)],
)
def test_onnx_equals_pytorch(
    tmp_path: Path, name: str, shape: tuple[int, ...], bound: float
) -> None:
    torch.manual_seed(0)
    model = build_split_model(name, shape, 10, features=16, hidden=32)
    device = nn.Sequential(split_model(model, SPLIT_LAYERS[name])[0], L1Bound(bound))
    device.eval()
    example = torch.randn(8, *shape) * 3
    report = export_device(device, example, tmp_path / "device.onnx", repeats=3)
    assert report.max_abs_diff <= 1e-5
    assert report.size_bytes == (tmp_path / "device.onnx").stat().st_size > 0
    assert report.parameters == sum(p.numel() for p in device.parameters())
    assert report.onnx_ms > 0 and report.torch_ms > 0
    # another batch size than the exported example: the batch axis is dynamic
    other = torch.randn(5, *shape) * 3
    got = onnx_outputs(tmp_path / "device.onnx", other)
    with torch.inference_mode():
        expected = device(other).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # the bound is part of the exported graph
    l1 = np.abs(got.astype(np.float64)).sum(1)
    assert (l1 <= bound).all()
