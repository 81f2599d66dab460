"""Checks every veil HTTP service applies to a request body before using it.

A body that carries tensors must be safetensors bytes and no larger than the service
allows. These helpers refuse, with a :class:`~veil.errors.ServiceError` naming the
status, what was found and what to send instead: a body over the size limit (from
``Content-Length`` before anything is read, then while the stream is counted, so an
oversized body is never held whole), a pickle or ``torch.save`` file (never loaded),
and bytes whose safetensors header is malformed. The header is parsed by hand, so a
service can check tensor names, dtypes and shapes before decoding any tensor.

Used by the private-inference service (:mod:`veil.inference.service`) and the
federated server (:mod:`veil.network`).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from starlette.requests import Request

from veil.errors import ServiceError

__all__ = ["read_body", "refuse_pickle", "safetensors_header"]

_PICKLE_PROTOCOLS = range(2, 6)


def refuse_pickle(payload: bytes) -> None:
    """Refuse (415) bytes that look like a pickle or a ``torch.save`` zip file."""
    is_pickle = len(payload) >= 2 and payload[0] == 0x80
    is_pickle = is_pickle and payload[1] in _PICKLE_PROTOCOLS
    if is_pickle or payload.startswith(b"PK\x03\x04"):
        raise ServiceError(
            "body looks like a pickle or torch.save file, which is never loaded: "
            "send safetensors bytes (safetensors.torch.save)",
            415,
        )


def safetensors_header(payload: bytes) -> dict[str, Any]:
    """The tensor entries of a safetensors header (``__metadata__`` left out).

    Raises:
        ServiceError: 400 when the bytes are too short, the header's length points
            past the end, or the header is not a JSON map.
    """
    if len(payload) < 8:
        raise ServiceError(
            f"body must be safetensors bytes, got {len(payload)} bytes", 400
        )
    (size,) = struct.unpack("<Q", payload[:8])
    if size > len(payload) - 8:
        raise ServiceError(
            f"body is not valid safetensors: its header claims {size} bytes, but "
            f"only {len(payload) - 8} follow",
            400,
        )
    try:
        header = json.loads(payload[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServiceError(f"body is not valid safetensors ({exc})", 400) from None
    if not isinstance(header, dict):
        raise ServiceError("body is not valid safetensors: header is not a map", 400)
    header.pop("__metadata__", None)
    return header


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed
    ``max_bytes``: from ``Content-Length`` first, then while the stream is read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServiceError(f"Content-Length must be a number, got {declared}", 400)
        if int(declared) > max_bytes:
            raise ServiceError(
                f"body must be at most {max_bytes} bytes, got {declared}", 413
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ServiceError(f"body must be at most {max_bytes} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)
