"""Compressed N:M layout: lossless round trips (bit for bit), blocked kernel layout, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmkit.formats import compress, decompress, from_blocked, pack_bits, to_blocked, unpack_bits
from nmkit.patterns import NM, PatternError
from nmkit.solvers.nm import nm_mask

PATTERNS = ["2:4", "1:4", "3:4", "2:8", "4:8", "1:16", "4:16", "8:16", "1:2", "3:6", "4:32"]


def _pruned(rows: int, cols: int, pattern: str, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return (w * nm_mask(w.abs(), pattern)).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    rows=st.integers(1, 13),
    groups=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
    zero_frac=st.floats(0, 1),
)
def test_round_trip_bit_exact(pattern, rows, groups, dtype, seed, zero_frac):
    p = NM.parse(pattern)
    w = _pruned(rows, groups * p.group, pattern, dtype, seed)
    # Extra zeros (groups with fewer than N non-zeros) and -0.0 must survive too.
    g = torch.Generator().manual_seed(seed + 1)
    w[torch.rand(w.shape, generator=g) < zero_frac] = 0.0
    t = compress(w, p)
    t.validate()
    back = decompress(t)
    assert back.dtype == w.dtype and back.shape == w.shape
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    # Bit exact, except a -0.0 with no free kept slot in its group comes back as +0.0.
    kept = unpack_bits(t.mask, w.shape[1])
    expected = torch.where(kept | (w != 0), w, torch.zeros_like(w))
    assert torch.equal(back.view(bits), expected.view(bits))
    # compressed -> dense -> compressed (same mask) is bit exact.
    t2 = compress(back, p, mask=kept)
    assert torch.equal(t2.values.view(bits), t.values.view(bits)) and torch.equal(t2.mask, t.mask)
    if 32 % p.group == 0:
        b = to_blocked(t)
        t2 = from_blocked(b)
        assert torch.equal(t2.values, t.values) and torch.equal(t2.mask, t.mask)


def test_negative_zero_kept_when_room():
    w = torch.tensor([[1.0, -0.0, 0.0, 0.0]])
    back = decompress(compress(w, "2:4"))
    assert torch.signbit(back[0, 1]) and back[0, 0] == 1.0


def test_layout_matches_packbits_little():
    import numpy as np

    m = torch.rand(3, 64) < 0.5
    assert np.array_equal(pack_bits(m).numpy(), np.packbits(m.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(unpack_bits(pack_bits(m)), m)


def test_values_in_row_major_column_order():
    w = torch.tensor([[0.0, 2.0, 3.0, 0.0, 5.0, 0.0, 0.0, 8.0]])
    t = compress(w, "2:4")
    assert t.values[0, :4].tolist() == [2.0, 3.0, 5.0, 8.0]
    assert t.kp == 32 and t.values.shape == (1, 16)  # padded to 32 columns, padding stores zeros


def test_too_dense_is_an_error():
    w = torch.ones(2, 8)
    with pytest.raises(PatternError, match="keep 2 of every 4"):
        compress(w, "2:4")


def test_cols_not_divisible():
    with pytest.raises(PatternError, match="not divisible"):
        compress(torch.zeros(2, 6), "2:4")


def test_explicit_mask():
    w = torch.randn(4, 16)
    mask = nm_mask(w.abs(), "2:4")
    t = compress(w, "2:4", mask=mask)
    assert torch.equal(decompress(t), w * mask)
    with pytest.raises(PatternError, match="exactly 2"):
        compress(w, "2:4", mask=torch.ones(4, 16, dtype=torch.bool))


def test_storage_size_bf16_24():
    t = compress(_pruned(64, 4096, "2:4", torch.bfloat16), "2:4")
    dense = 64 * 4096 * 2
    assert t.nbytes() / dense <= 0.57
