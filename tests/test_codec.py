"""Byte-plane Zstandard codec: bit-exact for every dtype and bit pattern, and damage is reported."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmkit.errors import UserError
from nmkit.formats.codec import decode, encode

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.bool]


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, -0.0, infinities, subnormals included)."""
    rng = np.random.default_rng(seed)
    size = torch.empty(0, dtype=dtype).element_size()
    n = int(np.prod(shape))
    raw = torch.empty(n * size, dtype=torch.uint8)
    raw.copy_(torch.from_numpy(rng.integers(0, 256, size=n * size, dtype=np.uint8)))
    if dtype == torch.bool:
        raw = raw & 1
    return raw.view(dtype).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
       seed=st.integers(0, 2**31))
def test_round_trip_is_bit_exact(dtype, shape, seed):
    t = _random_tensor(dtype, tuple(shape), seed)
    coded, table = encode({"t": t})
    assert coded["t"].dtype == torch.uint8 and coded["t"].dim() == 1
    back = decode(coded, table)["t"]
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_trained_like_weights_shrink_and_uncoded_pass_through():
    torch.manual_seed(0)
    w = (torch.randn(256, 256) * 0.02).to(torch.bfloat16)  # high byte: sign + a few exponents
    coded, table = encode({"w": w})
    assert coded["w"].numel() < 0.8 * w.numel() * 2
    extra = torch.arange(5)
    back = decode({**coded, "extra": extra}, table)
    assert torch.equal(back["w"].view(torch.int16), w.view(torch.int16)) and back["extra"] is extra


def test_damaged_plane_is_reported():
    coded, table = encode({"w": torch.randn(64, 64)})
    table["w"]["planes"][0] -= 3  # the first plane's frame is cut short
    with pytest.raises(UserError, match="damaged"):
        decode(coded, table)


def test_unsupported_dtype_is_named():
    with pytest.raises(UserError, match="complex64"):
        encode({"z": torch.zeros(3, dtype=torch.complex64)})
