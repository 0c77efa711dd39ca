"""Symmetric INT8 / INT4 codes for the kept values of an N:M weight, one fp16 scale per group.

The unit is the 64-input block: an N:M row keeps ``k64 = 64 * N / M`` values in each block, and a
scale covers ``group_blocks`` consecutive blocks of one row (``group_blocks * k64`` kept values:
32 for 2:4 at the default 1). Activations are quantized per 64-input block too, so each block's
integer dot product needs one multiply by (activation scale x weight scale).

Codes are ``round(w / s)`` clamped to [-127, 127] (INT8) or [-8, 7] (INT4). The scale is chosen per
group from a small grid of clipping ratios to minimise the squared error, weighted by an optional
per-input importance (the mean squared activation, as Wanda and GPTQ weigh columns): a weight that
meets large activations is rounded more carefully. The scale is rounded to fp16 *before* the codes
are computed, so the stored pair reproduces the dequantized weight exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmkit.errors import UserError
from nmkit.patterns import NM

_CLIP_GRID = torch.linspace(0.70, 1.0, 16)



def units_hold(keep: int, group: int) -> bool:
    """Whether ``keep:group`` fits the runtime's 64-value units: a unit spans 1, 2, 4 or 8 blocks of 64
    inputs, so a block must keep exactly 64, 32, 16 or 8 values."""
    return 64 * keep % group == 0 and 64 * keep // group in (8, 16, 32, 64)


def check_pattern(pattern: NM) -> None:
    """Refuse, with one line, an N:M that quantized storage cannot hold."""
    if 64 % pattern.group:
        raise UserError(f"quantized N:M needs M dividing 64 (2, 4, 8, 16), not {pattern}")
    if not units_hold(pattern.keep, pattern.group):
        raise UserError(f"quantized N:M stores 64-value units, so N/M must be 1/2, 1/4 or 1/8 "
                        f"(2:4, 1:4, 4:8, 2:8, ...), not {pattern}")

@dataclass(frozen=True)
class QuantSpec:
    """``bits`` (8 or 4) and ``group_blocks`` (64-input blocks per scale). ``levels``: for INT4, an optional
    table of 16 distinct sorted int8 values a 4-bit code stands for (a non-uniform grid, e.g. fitted to
    the layer's kept values: N:M keeps the large weights, so few kept values sit near zero); without
    it a code is the integer itself, in [-8, 7]."""

    bits: int
    group_blocks: int = 1
    levels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UserError(f"unsupported quantization bits {self.bits}: choose 8 or 4 (w8, w4)")
        if self.group_blocks not in (1, 2, 4, 8, 16):
            raise UserError(f"quantization group must span 1, 2, 4, 8 or 16 64-input blocks, got {self.group_blocks}")
        if self.levels is not None:
            lv = list(self.levels)
            if self.bits != 4 or len(lv) != 16 or lv != sorted(set(lv)) or not -127 <= lv[0] <= lv[-1] <= 127:
                raise UserError("a level table needs INT4 and 16 distinct increasing integers in [-127, 127]")

    def nearest(self, y: torch.Tensor) -> torch.Tensor:
        """The grid value nearest to ``y`` (in code units): a clamped integer, or the nearest table level
        (ties to the lower level)."""
        if self.levels is None:
            return torch.clamp(torch.round(y), self.qmin, self.qmax)
        table = torch.tensor(self.levels, dtype=y.dtype, device=y.device)
        mids = (table[1:] + table[:-1]) / 2
        return table[torch.bucketize(y, mids)]

    @property
    def top(self) -> int:
        """The largest magnitude a scale maps max |w| to in the clip search."""
        return self.qmax if self.levels is None else max(abs(self.levels[0]), abs(self.levels[-1]))

    @classmethod
    def parse(cls, spec: str | QuantSpec, group_blocks: int = 1) -> QuantSpec:
        if isinstance(spec, QuantSpec):
            return spec
        names = {"w8": 8, "int8": 8, "q8": 8, "w4": 4, "int4": 4, "q4": 4}
        if spec not in names:
            raise UserError(f"unknown quantization {spec!r}: choose one of w8, w4 (int8, int4)")
        return cls(names[spec], group_blocks)

    @property
    def qmin(self) -> int:
        """Smallest code value (a table's lowest level)."""
        if self.levels is not None:
            return self.levels[0]
        return -127 if self.bits == 8 else -8

    @property
    def qmax(self) -> int:
        if self.levels is not None:
            return self.levels[-1]
        return 127 if self.bits == 8 else 7

    def __str__(self) -> str:
        return f"w{self.bits}" + ("-levels" if self.levels is not None else "")


def _groups(x: torch.Tensor, group_blocks: int) -> torch.Tensor:
    """(rows, blocks, k64) -> (rows, groups, group_blocks * k64), zero-padding the last group."""
    rows, nb, k = x.shape
    pad = -nb % group_blocks
    if pad:
        x = torch.cat([x, x.new_zeros(rows, pad, k)], dim=1)
    return x.reshape(rows, -1, group_blocks * k)


def quantize_kept(kept: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept values (rows, blocks, k64) -> codes int8 (rows, blocks, k64) and fp16 scales (rows, groups).

    ``importance``: optional non-negative weights of the same shape as ``kept`` for the error.
    """
    rows, nb, k = kept.shape
    w = _groups(kept.float(), spec.group_blocks)
    imp = torch.ones_like(w) if importance is None else _groups(importance.float(), spec.group_blocks)
    amax = w.abs().amax(-1, keepdim=True)
    best_err = torch.full(amax.shape, float("inf"))
    best_s = torch.zeros_like(amax)
    for ratio in _CLIP_GRID.tolist():
        s = (amax * ratio / spec.top).half().float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = spec.nearest(w / s)
        err = (imp * (q * s - w) ** 2).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    best_s = torch.where(amax > 0, best_s, torch.zeros_like(best_s))
    safe = torch.where(best_s > 0, best_s, torch.ones_like(best_s))
    codes = spec.nearest(w / safe)
    codes = codes.reshape(rows, -1, k)[:, :nb].to(torch.int8)
    return codes.contiguous(), best_s.squeeze(-1).half().contiguous()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_blocks: int) -> torch.Tensor:
    """Codes (rows, blocks, k64) and scales (rows, groups) -> float32 kept values (rows, blocks, k64)."""
    per_block = scales.float().repeat_interleave(group_blocks, dim=1)[:, : codes.shape[1]]
    return codes.float() * per_block.unsqueeze(-1)


def fit_levels(kept: torch.Tensor, importance: torch.Tensor | None = None, group_blocks: int = 1,
               iters: int = 30) -> tuple[int, ...]:
    """A 16-level INT4 table for kept values (rows, blocks, k64): Lloyd's algorithm (1-D k-means,
    weighted by ``importance``) on the values divided by their scale group's max |w|, scaled to +-127
    and rounded to distinct integers. Deterministic (evenly spaced start, fixed iteration count)."""
    w = _groups(kept.float(), group_blocks)
    imp = torch.ones_like(w) if importance is None else _groups(importance.float(), group_blocks)
    amax = w.abs().amax(-1, keepdim=True)
    live = (amax > 0).expand_as(w)
    y, m = (w / torch.where(amax > 0, amax, torch.ones_like(amax)))[live], imp[live].double()
    centres = torch.linspace(-1, 1, 16, dtype=torch.float64)
    y = y.double()
    for _ in range(iters):
        cell = torch.bucketize(y, (centres[1:] + centres[:-1]) / 2)
        mass = torch.zeros(16, dtype=torch.float64).index_add_(0, cell, m)
        total = torch.zeros(16, dtype=torch.float64).index_add_(0, cell, m * y)
        centres = torch.where(mass > 0, total / mass.clamp(min=1e-300), centres)
    levels = torch.round(centres / centres.abs().max().clamp(min=1e-12) * 127).long().tolist()
    for i in range(1, 16):  # rounding may merge neighbours: keep them distinct and increasing
        levels[i] = max(levels[i], levels[i - 1] + 1)
    shift = max(0, levels[-1] - 127)
    return tuple(v - shift for v in levels)
