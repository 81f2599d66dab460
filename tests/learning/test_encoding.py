"""Encoding of tensors for the wire: exact sizes and refusal of malformed bytes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import UpdateError
from veil.learning.encoding import decode, encode, encoded_size

DTYPES = [
    torch.float32,
    torch.float64,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.float16,
]


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(alphabet="abcdefgh._0123456789", min_size=1, max_size=12),
        st.tuples(st.lists(st.integers(0, 5), max_size=3), st.sampled_from(DTYPES)),
        min_size=1,
        max_size=5,
    )
)
def test_encoded_size_is_exact(spec: dict[str, tuple[list[int], torch.dtype]]) -> None:
    tensors = {k: torch.zeros(shape, dtype=dt) for k, (shape, dt) in spec.items()}
    payload = encode(tensors)
    assert encoded_size(tensors) == len(payload)
    back = decode(payload)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_garbage_is_refused() -> None:
    with pytest.raises(UpdateError, match="not valid safetensors"):
        decode(b"\x80\x04not a tensor file")
