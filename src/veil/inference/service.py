"""The cloud service: the cloud part of a split model behind HTTP (FastAPI).

In the private-inference data flow this is the far end: a device posts perturbed
representations, the service runs the cloud part and answers with predictions. It only
ever sees what :class:`~veil.inference.device.Device` sends.

Endpoints:

- ``GET /info``: JSON ``{"tensor", "dtype", "features", "num_classes", "max_batch",
  "max_bytes"}``, what a request must look like.
- ``POST /predict``: the body is safetensors bytes holding exactly one float32
  tensor named ``representation`` of shape ``(N, features)``, ``1 <= N <=
  max_batch``, all values finite. The answer is JSON ``{"predictions": [N ints],
  "probabilities": [N lists of num_classes floats]}``.

Validation happens before the model runs, and every refusal is a JSON
``{"error": message}`` with a 4xx status: 413 when the body is larger than
``max_bytes`` (checked from ``Content-Length`` before reading, and again while
reading), 415 for a pickle or ``torch.save`` file (never loaded), 400 for bytes that
are not valid safetensors, 422 for the wrong tensor names, dtype or shape or a NaN or
infinite value. Nothing is unpickled, and a refused request changes no state (the
service holds none besides the frozen cloud part).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from safetensors.torch import load
from torch import nn

from veil._wire import read_body, refuse_pickle, safetensors_header
from veil.errors import ConfigError, ServiceError

__all__ = ["TENSOR_NAME", "create_app", "decode_representation", "max_request_bytes"]

logger = logging.getLogger(__name__)

#: Name of the tensor a request carries.
TENSOR_NAME = "representation"
# Room for the safetensors header (8-byte length and a short JSON header).
_HEADER_ROOM = 4096


def max_request_bytes(features: int, max_batch: int) -> int:
    """The largest valid request body: ``max_batch * features`` float32 values and
    the header."""
    return 8 + _HEADER_ROOM + 4 * features * max_batch


def _check_header(header: dict[str, Any], features: int, max_batch: int) -> None:
    if set(header) != {TENSOR_NAME}:
        raise ServiceError(
            f"body must hold exactly one tensor named {TENSOR_NAME!r}, got "
            f"{sorted(header)}",
            422,
        )
    entry = header[TENSOR_NAME]
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if dtype != "F32":
        raise ServiceError(f"{TENSOR_NAME} must be float32 (F32), got {dtype}", 422)
    valid = (
        isinstance(shape, list)
        and len(shape) == 2
        and shape[1] == features
        and isinstance(shape[0], int)
        and 1 <= shape[0] <= max_batch
    )
    if not valid:
        raise ServiceError(
            f"{TENSOR_NAME} must have shape (N, {features}) with 1 <= N <= "
            f"{max_batch}, got {shape}",
            422,
        )


def decode_representation(
    payload: bytes, features: int, max_batch: int
) -> torch.Tensor:
    """The validated ``(N, features)`` float32 tensor of a request body.

    Raises:
        ServiceError: with status 415 (pickle), 400 (not safetensors) or 422 (wrong
            names, dtype, shape, or a non-finite value); see the module docstring.
    """
    refuse_pickle(payload)
    _check_header(safetensors_header(payload), features, max_batch)
    try:
        tensors = load(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise ServiceError(f"body is not valid safetensors ({exc})", 400) from None
    r = tensors[TENSOR_NAME]
    if not bool(torch.isfinite(r).all()):
        raise ServiceError(f"{TENSOR_NAME} must be finite, got NaN or inf", 422)
    return r


def create_app(
    cloud_part: nn.Module, features: int, num_classes: int, max_batch: int = 256
) -> FastAPI:
    """The FastAPI app serving ``cloud_part`` (see the module docstring).

    Args:
        cloud_part: maps ``(N, features)`` float32 representations to
            ``(N, num_classes)`` logits; frozen and put in eval mode here.
        features: width ``d`` of a representation, >= 1.
        num_classes: number of classes, >= 2.
        max_batch: most representations per request, >= 1.
    """
    if features < 1 or num_classes < 2 or max_batch < 1:
        raise ConfigError(
            "features and max_batch must be >= 1 and num_classes >= 2, got "
            f"{features}, {max_batch} and {num_classes}"
        )
    cloud_part.eval().requires_grad_(False)
    max_bytes = max_request_bytes(features, max_batch)
    app = FastAPI(title="veil cloud part", docs_url=None, redoc_url=None)

    @app.exception_handler(ServiceError)
    async def _refused(request: Request, exc: ServiceError) -> JSONResponse:
        logger.info("refused %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": str(exc)}, status_code=exc.status_code)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {
            "tensor": TENSOR_NAME,
            "dtype": "float32",
            "features": features,
            "num_classes": num_classes,
            "max_batch": max_batch,
            "max_bytes": max_bytes,
        }

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        payload = await read_body(request, max_bytes)
        r = decode_representation(payload, features, max_batch)
        with torch.inference_mode():
            probabilities = torch.softmax(cloud_part(r), dim=1)
        if not math.isfinite(float(probabilities.sum())):
            raise ServiceError("the cloud part produced non-finite output", 500)
        logger.info("predicted %d representations", len(r))
        return {
            "predictions": probabilities.argmax(1).tolist(),
            "probabilities": probabilities.tolist(),
        }

    return app
