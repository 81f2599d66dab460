"""How tensors are put into bytes when they leave a client or the server.

Every tensor that crosses a process, file or network boundary travels as safetensors
(never pickle). :func:`encoded_size` gives the exact number of bytes of that encoding,
which is what the run's ``bytes_up`` and ``bytes_down`` metrics count.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load, save

from veil.errors import UpdateError
from veil.learning._types import StateDict

__all__ = ["decode", "encode", "encoded_size"]


def encode(tensors: StateDict) -> bytes:
    """The safetensors bytes of ``tensors`` (contiguous CPU copies)."""
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def decode(payload: bytes) -> StateDict:
    """Tensors from safetensors bytes; anything else is an :class:`UpdateError`."""
    try:
        return load(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise UpdateError(f"payload is not valid safetensors ({exc})") from None


def encoded_size(tensors: StateDict) -> int:
    """Exact length in bytes of :func:`encode` ``(tensors)``, without encoding.

    The safetensors layout is an 8-byte little-endian header length, a JSON header
    padded with spaces to a multiple of 8 bytes, then the raw tensor data.
    """
    header: dict[str, object] = {}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"))
    padded = len(text) + (-len(text)) % 8
    return 8 + padded + offset


_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
