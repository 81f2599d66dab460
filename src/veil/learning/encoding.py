"""How tensors are put into bytes when they leave a client or the server.

Every tensor that crosses a process, file or network boundary travels as safetensors
(never pickle). :func:`encoded_size` gives the exact number of bytes of that encoding,
which is what the run's ``bytes_up`` and ``bytes_down`` metrics count.
"""

from __future__ import annotations

import functools

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


Layout = tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]


def encoded_size(tensors: StateDict) -> int:
    """Exact length in bytes of :func:`encode` ``(tensors)``.

    The length depends only on the tensors' names, dtypes and shapes (the header
    lists them and the data follows, a fixed number of bytes per element), not on
    their values. It is measured by encoding zeros of that layout once, and
    remembered: the header's exact layout stays the safetensors library's business,
    and a round of many clients does not copy every update to count its bytes.
    """
    layout = tuple((name, t.dtype, tuple(t.shape)) for name, t in tensors.items())
    return _layout_size(layout)


@functools.lru_cache(maxsize=1024)
def _layout_size(layout: Layout) -> int:
    zeros = {name: torch.zeros(shape, dtype=dtype) for name, dtype, shape in layout}
    return len(save(zeros))
