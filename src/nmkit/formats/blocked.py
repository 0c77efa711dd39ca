"""The kernel layout: the canonical values + bitmask regrouped into 4-row x 32-column blocks.

For every block of 4 rows and every 32-column unit, the kept values of rows 0..3 in that unit are
stored one after another (``32 * N / M`` each), and so are their 32-bit masks. A kernel that
computes 4 output rows at once then reads a single value stream and a single mask stream, which
the hardware prefetchers follow much better than 8 separate row streams. Rows are padded to a
multiple of 4 (padding rows keep the first N of each group, with value 0).

Only for patterns whose M divides 32 (every 32-column unit then keeps the same number of values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmkit.formats.nm import NMTensor, pack_bits
from nmkit.formats.nm import zeros as nm_zeros
from nmkit.patterns import NM, PatternError


@dataclass
class BlockedNM:
    """Compressed N:M weight in the kernel layout (see module docstring)."""

    values: torch.Tensor  # (rows_p / 4, kp / 32, 4, 32 * N / M)
    mask: torch.Tensor  # uint8 (rows_p / 4, kp / 32, 4, 4): little-endian uint32 per row and unit
    shape: tuple[int, int]
    pattern: NM

    @property
    def kp(self) -> int:
        return self.mask.shape[1] * 32

    @property
    def p16(self) -> int:
        return 16 * self.pattern.keep // self.pattern.group

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.mask.numel()


def _pad_rows(t: NMTensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = t.shape[0]
    extra = -rows % 4
    if not extra:
        return t.values, t.mask
    n, m = t.pattern.keep, t.pattern.group
    pad_mask = torch.zeros(extra, t.kp // m, m, dtype=torch.bool)
    pad_mask[..., :n] = True
    values = torch.cat([t.values, t.values.new_zeros(extra, t.values.shape[1])])
    mask = torch.cat([t.mask, pack_bits(pad_mask.reshape(extra, t.kp).to(t.mask.device))])
    return values, mask


def to_blocked(t: NMTensor) -> BlockedNM:
    """Regroup a canonical :class:`NMTensor` into the kernel layout (a copy)."""
    if 32 % t.pattern.group:
        raise PatternError(f"the kernel layout needs M to divide 32, got pattern {t.pattern}")
    values, mask = _pad_rows(t)
    rb, nu, q = values.shape[0] // 4, t.kp // 32, 32 * t.pattern.keep // t.pattern.group
    v = values.reshape(rb, 4, nu, q).permute(0, 2, 1, 3).contiguous()
    mk = mask.reshape(rb, 4, nu, 4).permute(0, 2, 1, 3).contiguous()
    return BlockedNM(values=v, mask=mk, shape=t.shape, pattern=t.pattern)


def from_blocked(b: BlockedNM) -> NMTensor:
    """Inverse of :func:`to_blocked`."""
    rb, nu, _, q = b.values.shape
    rows = b.shape[0]
    values = b.values.permute(0, 2, 1, 3).reshape(rb * 4, nu * q)[:rows].contiguous()
    mask = b.mask.permute(0, 2, 1, 3).reshape(rb * 4, nu * 4)[:rows].contiguous()
    return NMTensor(values=values, mask=mask, shape=b.shape, pattern=b.pattern)


def zeros_blocked(shape: tuple[int, int], pattern: NM | str, dtype: torch.dtype = torch.float32) -> BlockedNM:
    """``to_blocked(formats.zeros(shape, pattern, dtype))`` without the regrouping copy: every 4-row
    block of an all-zero weight has the same mask bytes."""
    pattern = NM.parse(pattern)
    rows, cols = shape
    one = to_blocked(nm_zeros((4, cols), pattern, dtype=dtype))  # one 4-row block
    rb = -(-rows // 4)
    values = torch.zeros((rb, *one.values.shape[1:]), dtype=dtype)
    mask = one.mask.expand(rb, *one.mask.shape[1:]).contiguous()
    return BlockedNM(values=values, mask=mask, shape=(rows, cols), pattern=pattern)
