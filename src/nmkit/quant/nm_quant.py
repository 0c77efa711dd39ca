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

_CLIP_GRID = torch.linspace(0.70, 1.0, 16)


@dataclass(frozen=True)
class QuantSpec:
    """``bits`` (8 or 4) and ``group_blocks`` (64-input blocks per scale)."""

    bits: int
    group_blocks: int = 1

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UserError(f"unsupported quantization bits {self.bits}: choose 8 or 4 (w8, w4)")
        if self.group_blocks not in (1, 2, 4, 8, 16):
            raise UserError(f"quantization group must span 1, 2, 4, 8 or 16 64-input blocks, got {self.group_blocks}")

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
        return -127 if self.bits == 8 else -8

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7

    def __str__(self) -> str:
        return f"w{self.bits}"


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
        s = (amax * ratio / spec.qmax).half().float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(w / s), spec.qmin, spec.qmax)
        err = (imp * (q * s - w) ** 2).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    best_s = torch.where(amax > 0, best_s, torch.zeros_like(best_s))
    safe = torch.where(best_s > 0, best_s, torch.ones_like(best_s))
    codes = torch.clamp(torch.round(w / safe), spec.qmin, spec.qmax)
    codes = codes.reshape(rows, -1, k)[:, :nb].to(torch.int8)
    return codes.contiguous(), best_s.squeeze(-1).half().contiguous()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_blocks: int) -> torch.Tensor:
    """Codes (rows, blocks, k64) and scales (rows, groups) -> float32 kept values (rows, blocks, k64)."""
    per_block = scales.float().repeat_interleave(group_blocks, dim=1)[:, : codes.shape[1]]
    return codes.float() * per_block.unsqueeze(-1)
