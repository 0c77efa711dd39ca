"""The vectorised packer (``compress`` / ``decompress`` / ``zeros`` and the ct24 export) against a
plain loop-per-group reference written from the layout spec in docs/kernels.md: same bytes."""

from __future__ import annotations

import math
import struct

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmkit import sidecar
from nmkit.formats import compress, decompress, zeros
from nmkit.formats.io import _positive_zeros
from nmkit.patterns import NM

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PATTERNS = ["1:4", "2:4", "3:4", "1:8", "2:8", "4:8", "1:16", "4:16", "8:16"]
INT_VIEW = {4: torch.int32, 2: torch.int16}


def _bits(t: torch.Tensor) -> list[int]:
    return t.contiguous().view(INT_VIEW[t.element_size()]).reshape(-1).tolist()


def reference_pack(w: torch.Tensor, n: int, m: int) -> tuple[list[list[int]], bytes]:
    """Per row: the kept values' bit patterns; the mask bytes. One group at a time, by the spec:
    keep the non-zeros, then -0.0, then +0.0, lowest column first; pad columns to lcm(32, M) with
    groups that keep their first N slots (value 0); bit j of byte b is column 8b + j."""
    rows, cols = w.shape
    kp = -(-cols // math.lcm(32, m)) * math.lcm(32, m)
    zero_bits = _bits(torch.zeros(1, dtype=w.dtype))[0]
    neg_zero_bits = _bits(torch.tensor([-0.0], dtype=w.dtype))[0]
    all_values, mask_bytes = [], bytearray()
    for r in range(rows):
        row = _bits(w[r]) + [zero_bits] * (kp - cols)
        row_nonzero = [x != 0 for x in w[r].tolist()] + [False] * (kp - cols)
        kept_cols, values = [], []
        for g in range(kp // m):
            cols_g = range(g * m, (g + 1) * m)

            def rank(c, row=row, row_nonzero=row_nonzero):
                return (0 if row_nonzero[c] else 1 if row[c] == neg_zero_bits else 2, c)

            keep = sorted(sorted(cols_g, key=rank)[:n])
            assert sum(row_nonzero[c] for c in cols_g) <= n
            kept_cols += keep
            values += [row[c] for c in keep]
        all_values.append(values)
        bits = [0] * kp
        for c in kept_cols:
            bits[c] = 1
        mask_bytes += bytes(sum(bits[8 * b + j] << j for j in range(8)) for b in range(kp // 8))
    return all_values, bytes(mask_bytes)


def _random_pruned(rows, groups, pattern, dtype, seed, zero_frac, negzero_frac):
    p = NM.parse(pattern)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * p.group, generator=g)
    keep = torch.rand(rows, groups, p.group, generator=g).argsort(-1)[..., : p.keep]
    mask = torch.zeros(rows, groups, p.group, dtype=torch.bool).scatter_(-1, keep, True).reshape(w.shape)
    w = w * mask  # negative pruned weights become -0.0
    w[torch.rand(w.shape, generator=g) < zero_frac] = 0.0  # groups with fewer than N non-zeros
    flip = (w == 0) & (torch.rand(w.shape, generator=g) < negzero_frac)
    w[flip] = -w[flip].abs()  # a mix of +0.0 and -0.0
    return w.to(dtype)


@settings(max_examples=80, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    rows=st.integers(1, 6),
    groups=st.integers(1, 20),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    zero_frac=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    negzero_frac=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_compress_matches_reference(pattern, rows, groups, dtype, seed, zero_frac, negzero_frac):
    p = NM.parse(pattern)
    w = _random_pruned(rows, groups, pattern, dtype, seed, zero_frac, negzero_frac)
    t = compress(w, p)
    values, mask = reference_pack(w, p.keep, p.group)
    assert t.values.dtype == dtype and t.mask.dtype == torch.uint8
    assert [_bits(v) for v in t.values] == values
    assert t.mask.contiguous().numpy().tobytes() == mask
    # decompress puts every stored value back where its mask bit is, zeros elsewhere.
    dense = decompress(t)
    expected = torch.zeros(rows, t.kp, dtype=dtype)
    kept = torch.tensor([[(byte >> j) & 1 for byte in row for j in range(8)] for row in t.mask.tolist()]).bool()
    expected[kept] = t.values.reshape(-1)
    assert _bits(dense) == _bits(expected[:, : w.shape[1]])


@settings(max_examples=30, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), rows=st.integers(1, 9), groups=st.integers(1, 20),
       dtype=st.sampled_from(DTYPES))
def test_zeros_is_compress_of_zeros(pattern, rows, groups, dtype):
    p = NM.parse(pattern)
    z = zeros((rows, groups * p.group), p, dtype=dtype)
    ref = compress(torch.zeros(rows, groups * p.group, dtype=dtype), p)
    assert torch.equal(z.values, ref.values) and z.values.dtype == dtype and torch.equal(z.mask, ref.mask)


@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_positive_zeros_touches_only_negative_zero(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, generator=g).to(dtype)
    w[::3] = -0.0
    w[1::5] = 0.0
    w[2] = float("nan")
    out = _positive_zeros(w)
    expected = [0 if x == _bits(torch.tensor([-0.0], dtype=dtype))[0] else x for x in _bits(w)]
    assert _bits(out) == expected


def test_ct24_bytes_match_reference(tmp_path):
    """compressed-tensors-24 tensors: the 2:4 reference on the -0.0-normalised weight, unpadded."""
    from safetensors.torch import load_file, save_file

    from nmkit.formats.io import export_ct24

    w = _random_pruned(16, 10, "2:4", torch.float32, 3, 0.1, 0.5)  # 40 columns: padded to 64 inside
    src = tmp_path / "src"
    src.mkdir()
    save_file({"l.weight": w}, str(src / "model.safetensors"))
    sidecar.write(src, {"l": {"pattern": "2:4", "shape": [16, 40]}})  # export checks the sidecar's format
    export_ct24(src, tmp_path / "ct")
    out = load_file(str(tmp_path / "ct" / "model.safetensors"))
    values, mask = reference_pack(w.masked_fill(w == 0, 0), 2, 4)
    assert [_bits(v) for v in out["l.compressed"]] == [v[:20] for v in values]
    kp_bytes = len(mask) // 16
    assert out["l.bitmask"].numpy().tobytes() == b"".join(mask[r * kp_bytes: r * kp_bytes + 5] for r in range(16))
    assert struct.unpack("<2q", out["l.shape"].numpy().tobytes()) == (16, 40)


@settings(max_examples=60, deadline=None)
@given(pattern=st.sampled_from(PATTERNS + ["1:2", "3:6", "4:32", "16:32"]), rows=st.integers(1, 5),
       seed=st.integers(0, 2**16), flips=st.integers(0, 3))
def test_keeps_exactly_matches_unpacked_count(pattern, rows, seed, flips):
    """validate()'s byte-table check agrees with counting the unpacked bits, on valid and broken masks."""
    from nmkit.formats.nm import _keeps_exactly, unpack_bits

    p = NM.parse(pattern)
    w = _random_pruned(rows, 96 // p.group, pattern, torch.float32, seed, 0.0, 0.0)
    mask = compress(w, p).mask.clone()
    g = torch.Generator().manual_seed(seed)
    for _ in range(flips):  # flip random bits: usually breaks a group's count
        r, b, j = (int(torch.randint(0, k, (1,), generator=g)) for k in (rows, mask.shape[1], 8))
        mask[r, b] ^= 1 << j
    counts = unpack_bits(mask).reshape(rows, -1, p.group).sum(-1)
    assert _keeps_exactly(mask, p.keep, p.group) == bool((counts == p.keep).all())


@settings(max_examples=30, deadline=None)
@given(pattern=st.sampled_from(["1:4", "2:4", "2:8", "4:8", "1:16", "8:16", "4:32"]), rows=st.integers(1, 11),
       groups=st.integers(1, 20), dtype=st.sampled_from(DTYPES))
def test_zeros_blocked_is_blocked_zeros(pattern, rows, groups, dtype):
    from nmkit.formats import to_blocked, zeros_blocked

    p = NM.parse(pattern)
    shape = (rows, groups * p.group)
    a, b = zeros_blocked(shape, p, dtype), to_blocked(zeros(shape, p, dtype=dtype))
    assert torch.equal(a.values, b.values) and a.values.dtype == dtype and torch.equal(a.mask, b.mask)
    assert a.shape == b.shape and a.values.is_contiguous() and a.mask.is_contiguous()
