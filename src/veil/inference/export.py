"""Device-side export: the device part as an ONNX file, checked with onnxruntime.

A phone runs the device part with an ONNX runtime, not PyTorch. :func:`export_device`
writes the device part, including its :class:`~veil.inference.perturb.L1Bound` (the
deterministic half of the perturbation), to ONNX with a dynamic batch dimension, runs
the file with onnxruntime on the same inputs as PyTorch, and refuses the export when
the outputs differ by more than ``atol`` (noise off: nullification and Laplace noise
are random and stay in the device's own code). It reports the file's size, the
parameter count and the median latency of one input in both runtimes.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.errors import VeilError

__all__ = ["ExportReport", "export_device", "onnx_outputs"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_device` wrote and measured.

    Attributes:
        path: the ONNX file.
        size_bytes: its size.
        parameters: parameters of the device part.
        max_abs_diff: largest absolute difference between the ONNX and PyTorch
            outputs on the check inputs.
        onnx_ms, torch_ms: median latency of one input, in milliseconds.
    """

    path: Path
    size_bytes: int
    parameters: int
    max_abs_diff: float
    onnx_ms: float
    torch_ms: float


def onnx_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    """Run the ONNX file at ``path`` on ``x`` with onnxruntime (CPU, one thread)."""
    session = _session(path)
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.numpy()})[0]


def _session(path: Path) -> Any:
    import onnxruntime as ort  # imported late: only export and its checks need it

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def export_device(
    device_part: nn.Module,
    example: torch.Tensor,
    path: Path,
    atol: float = 1e-5,
    repeats: int = 50,
) -> ExportReport:
    """Write ``device_part`` to ONNX at ``path`` and check it against PyTorch.

    Args:
        device_part: the frozen device part (ending in its ``L1Bound``).
        example: check inputs ``(N, *input_shape)``, N >= 1; the first one is also
            the latency input.
        path: where to write the ``.onnx`` file.
        atol: largest absolute difference allowed between the two runtimes.
        repeats: timed runs per runtime for the latency.

    Raises:
        VeilError: the ONNX output differs from PyTorch's by more than ``atol``
            (the file is removed).
    """
    device_part.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            device_part,
            (example[:1],),
            str(path),
            input_names=["input"],
            output_names=["representation"],
            dynamic_axes={"input": {0: "batch"}, "representation": {0: "batch"}},
            dynamo=False,
        )
    with torch.inference_mode():
        expected = device_part(example).numpy()
    got = onnx_outputs(path, example)
    diff = (
        float(np.abs(got - expected).max()) if got.shape == expected.shape else np.inf
    )
    if not diff <= atol:
        path.unlink(missing_ok=True)
        raise VeilError(
            f"ONNX output must match PyTorch within {atol}, got a difference of "
            f"{diff} (shapes {got.shape} and {expected.shape}); the file was removed"
        )
    session = _session(path)
    name = session.get_inputs()[0].name
    one = example[:1]
    feed = {name: one.numpy()}
    with torch.inference_mode():
        torch_ms = _median_ms(lambda: device_part(one), repeats)
    onnx_ms = _median_ms(lambda: session.run(None, feed), repeats)
    report = ExportReport(
        path=path,
        size_bytes=path.stat().st_size,
        parameters=sum(p.numel() for p in device_part.parameters()),
        max_abs_diff=diff,
        onnx_ms=onnx_ms,
        torch_ms=torch_ms,
    )
    logger.info("exported the device part to %s (%d bytes)", path, report.size_bytes)
    return report
