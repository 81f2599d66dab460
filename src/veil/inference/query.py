"""``veil infer query``: one round trip of private inference, from a phone's side.

Reads the device part of a run directory, the inputs (a safetensors file or the first
test inputs of the dataset), and the device's privacy ledger (a JSON file, so the
budget holds across calls); checks the budget, perturbs, saves the ledger *before*
anything is sent (a representation that left the phone is spent even if the cloud
fails), asks the cloud with :class:`~veil.inference.client.CloudClient`, and returns
the predictions with the epsilon spent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from veil.data import load_dataset
from veil.errors import DataError
from veil.inference.artifacts import SplitSpec, load_split
from veil.inference.client import CloudClient
from veil.inference.device import Device
from veil.privacy import PrivacyLedger

__all__ = ["read_inputs", "run_query"]


def read_inputs(path: Path, spec: SplitSpec) -> torch.Tensor:
    """The float32 tensor ``x`` of shape ``(N, *input_shape)`` in a safetensors file.

    Raises:
        DataError: the file is missing or not safetensors, or ``x`` is missing, of
            the wrong shape or dtype, or not finite.
    """
    try:
        tensors = load_file(path)
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise DataError(f"{path} must be a safetensors file ({exc})") from None
    x = tensors.get("x")
    shape = tuple(spec.input_shape)
    if x is None or x.dtype != torch.float32 or tuple(x.shape[1:]) != shape:
        found = None if x is None else (x.dtype, tuple(x.shape))
        raise DataError(
            f"{path} must hold a float32 tensor 'x' of shape (N, {shape}), got {found}"
        )
    if len(x) == 0 or not bool(torch.isfinite(x).all()):
        raise DataError(f"{path}: 'x' must hold at least one input, all finite")
    return x


def run_query(
    run_dir: Path,
    url: str,
    inputs: Path | None = None,
    count: int = 8,
    epsilon: float | None = None,
    budget: float | None = None,
    ledger_path: Path | None = None,
    data_dir: Path | None = None,
    client: httpx.Client | None = None,
) -> dict[str, Any]:
    """Perturb inputs on the device and ask the cloud at ``url``.

    Args:
        run_dir: run directory of ``veil infer train``.
        url: the cloud service's base URL.
        inputs: safetensors file with ``x``; default: the first ``count`` test
            inputs of the run's dataset.
        count: how many test inputs when ``inputs`` is ``None``, >= 1.
        epsilon: per-query epsilon; default: the run's deployed epsilon.
        budget: the device's total epsilon (basic composition), or ``None``.
        ledger_path: JSON file holding the device's ledger (created if missing).
        data_dir: where datasets are found.
        client: an ``httpx.Client`` to send with (tests).

    Returns:
        ``predictions``, ``labels`` (test inputs only), ``epsilon`` per query,
        ``epsilon_spent`` (all queries of the ledger) and ``queries_left``.
    """
    split = load_split(run_dir, clouds=[])
    spec = split.spec
    ledger = PrivacyLedger()
    if ledger_path is not None and ledger_path.exists():
        ledger = PrivacyLedger.from_json(ledger_path.read_text())
    labels = None
    if inputs is not None:
        x = read_inputs(inputs, spec)
    else:
        test = load_dataset(spec.dataset, data_dir).test
        x, labels = test.x[:count], test.y[:count].tolist()
    device = Device(split.device_part, spec.perturbation(epsilon), budget, ledger)
    representation = device.perturb(x)
    if ledger_path is not None:
        ledger_path.write_text(device.ledger.to_json() + "\n")
    cloud = CloudClient(url, client=client)
    try:
        answer = cloud.predict(representation)
    finally:
        if client is None:
            cloud.close()
    left = device.queries_left()
    return {
        "predictions": answer.labels,
        "labels": labels,
        "epsilon": device.perturbation.epsilon,
        "epsilon_spent": device.epsilon_spent,
        "queries_left": math.inf if left is None else left,
    }
