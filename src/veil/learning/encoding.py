"""How tensors are put into bytes when they leave a client or the server.

Every tensor that crosses a process, file or network boundary travels as safetensors
(never pickle). :func:`encoded_size` gives the exact number of bytes of that encoding,
which is what the run's ``bytes_up`` and ``bytes_down`` metrics count.
"""

from __future__ import annotations

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
    """Exact length in bytes of :func:`encode` ``(tensors)``.

    It is measured by encoding: the header's layout is the safetensors library's
    business, and a copy of a few megabytes costs milliseconds per client.
    """
    return len(encode(tensors))
