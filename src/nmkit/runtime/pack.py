"""Weight matrices in the runtime's layouts, and the torch reference of what the C kernels compute.

A :class:`PackedMat` holds one Linear weight as fp32, bf16, INT8 or INT4 kept values, the N:M
bitmask (absent when dense) and, for the integer kinds, fp16 scales per group of 64-input blocks
(layouts: the header of ``csrc/nmkit_runtime.c``). :func:`reference_matmul` is the pure-torch
statement of the kernels' arithmetic, which the tests hold every ISA path to.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from nmkit.errors import UserError
from nmkit.formats.nm import pack_bits, unpack_bits
from nmkit.patterns import NM
from nmkit.quant import QuantSpec, dequantize, quantize_kept
from nmkit.runtime.native import KINDS, MatStruct, lib
from nmkit.solvers.nm import nm_mask

SUPPORTED_GROUPS = (2, 4, 8, 16)


@dataclass
class PackedMat:
    kind: str  # fp32, bf16, int8, int4
    rows: int
    cols: int
    pattern: NM | None  # None: dense
    values: torch.Tensor
    mask: torch.Tensor | None
    scales: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    group_blocks: int = 1
    levels: torch.Tensor | None = None  # int4 only: int8 (16,) table, code n stands for levels[n] (else n - 8)

    @property
    def keep(self) -> int:
        return self.pattern.keep if self.pattern else 1

    @property
    def group(self) -> int:
        return self.pattern.group if self.pattern else 1

    @property
    def k64(self) -> int:
        return 64 * self.keep // self.group

    def nbytes(self) -> int:
        """Bytes the kernel reads for one token (values, mask, scales, bias)."""
        parts = (self.values, self.mask, self.scales, self.bias, self.levels)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def widened(self) -> PackedMat:
        """An int4 matrix with a level table as int8 codes (the level values) with the same scales: the
        same products, in a layout the C kernels run today."""
        if self.levels is None:
            return self
        return PackedMat("int8", self.rows, self.cols, self.pattern, code_values(self.codes(), "int8"), self.mask,
                         self.scales, self.bias, self.group_blocks)

    def struct(self) -> MatStruct:
        if self.levels is not None:
            raise UserError("the runtime kernels do not read INT4 level tables yet; run PackedMat.widened()")
        def ptr(t):
            return None if t is None else t.data_ptr()

        return MatStruct(KINDS[self.kind], self.rows, self.cols, self.keep, self.group, self.group_blocks,
                         ptr(self.values), ptr(self.mask), ptr(self.scales), ptr(self.bias))

    def kept_mask(self) -> torch.Tensor:
        if self.mask is None:
            return torch.ones(self.rows, self.cols, dtype=torch.bool)
        return unpack_bits(self.mask, self.cols)

    def kept_values(self) -> torch.Tensor:
        """float32 (rows, kept per row), dequantized for the integer kinds."""
        if self.kind == "fp32":
            return self.values
        if self.kind == "bf16":
            return self.values.float()
        return dequantize(self.codes(), self.scales, self.group_blocks).reshape(self.rows, -1)

    def codes(self) -> torch.Tensor:
        """int8 (rows, blocks, k64) integer codes of the integer kinds."""
        nb = self.cols // 64
        if self.kind == "int8":
            flat = self.values
        else:
            packed = self.values.reshape(self.rows, -1, 32)
            lo, hi = (packed & 15).long(), (packed >> 4).long()
            nibbles = torch.cat([lo, hi], dim=-1).reshape(self.rows, -1)
            flat = (nibbles - 8 if self.levels is None else self.levels.long()[nibbles]).to(torch.int8)
        return flat[:, : nb * self.k64].reshape(self.rows, nb, self.k64)

    def dense_weight(self) -> torch.Tensor:
        """float32 (rows, cols): the weight these kernels multiply by."""
        w = torch.zeros(self.rows, self.cols)
        w[self.kept_mask()] = self.kept_values().reshape(-1)
        return w


def _check_shape(name: str, weight: torch.Tensor, pattern: NM | None) -> None:
    if weight.dim() != 2:
        raise UserError(f"{name}: the runtime packs 2-d Linear weights, got shape {tuple(weight.shape)}")
    if weight.shape[1] % 64:
        raise UserError(f"{name}: the runtime needs in_features divisible by 64, got {weight.shape[1]}")
    if pattern is not None and pattern.group not in SUPPORTED_GROUPS:
        raise UserError(f"{name}: pattern {pattern} is not supported by the runtime (M must be one of "
                        f"{SUPPORTED_GROUPS}); prune to 2:4, 1:4, 2:8, 4:8 or 8:16")


def pack(weight: torch.Tensor, kind: str, pattern: NM | None = None, *, bias: torch.Tensor | None = None,
         group_blocks: int = 1, importance: torch.Tensor | None = None, name: str = "weight") -> PackedMat:
    """Pack a (rows, cols) weight. ``pattern``: the N:M it already follows (zeros where pruned), or
    None for dense. ``importance``: optional per-input weights (cols,) for the integer kinds' scales."""
    if kind not in KINDS:
        raise UserError(f"unknown weight kind {kind!r}: choose one of {', '.join(KINDS)}")
    _check_shape(name, weight, pattern)
    w = weight.detach().float().contiguous()
    rows, cols = w.shape
    if pattern is None:
        keep = torch.ones_like(w, dtype=torch.bool)
    else:
        keep = nm_mask((w != 0).float() + w.abs(), pattern)  # nonzeros first, ties by index
        if bool((w[~keep] != 0).any()):
            raise UserError(f"{name}: weight does not follow {pattern} (a group has more than "
                            f"{pattern.keep} non-zeros); prune it first")
    kept = w[keep].reshape(rows, -1)
    mask = None if pattern is None else pack_bits(keep)
    b = None if bias is None else bias.detach().float().contiguous()
    p = PackedMat(kind, rows, cols, pattern, kept, mask, bias=b, group_blocks=group_blocks)
    if kind == "bf16":
        p.values = kept.to(torch.bfloat16).contiguous()
    elif kind in ("int8", "int4"):
        nb = cols // 64
        imp = None
        if importance is not None:
            imp = importance.float().expand(rows, cols)[keep].reshape(rows, nb, p.k64)
        codes, scales = quantize_kept(kept.reshape(rows, nb, p.k64), QuantSpec(8 if kind == "int8" else 4,
                                                                                 group_blocks), imp)
        p.scales = scales
        p.values = code_values(codes, kind)
    return p


def code_values(codes: torch.Tensor, kind: str, levels: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes (rows, blocks, k64) -> the values layout of ``kind`` (int8 or int4), whole 64-value units.
    With ``levels`` (int4), each code is stored as its index in the table (padding: index 0)."""
    rows = codes.shape[0]
    flat = codes.reshape(rows, -1)
    pad = -flat.shape[1] % 64
    if kind == "int8":
        return torch.cat([flat, flat.new_zeros(rows, pad)], dim=1).contiguous()
    if levels is None:
        nibbles = flat.long() + 8
    else:
        nibbles = torch.searchsorted(levels.long(), flat.long().contiguous())
    nibbles = torch.cat([nibbles, nibbles.new_full((rows, pad), 0 if levels is not None else 8)], dim=1)
    u = nibbles.to(torch.uint8).reshape(rows, -1, 64)
    return (u[..., :32] | (u[..., 32:] << 4)).reshape(rows, -1).contiguous()


def from_codes(codes: torch.Tensor, scales: torch.Tensor, keep: torch.Tensor, pattern: NM | None, bits: int,
               group_blocks: int, bias: torch.Tensor | None = None,
               levels: tuple[int, ...] | None = None) -> PackedMat:
    """A quantized PackedMat straight from codes (rows, blocks, k64), fp16 scales and the kept mask
    (rows, cols), e.g. from a calibrated quantization, with no re-rounding. ``levels``: the INT4 table
    the codes are values of (stored as their indices)."""
    kind = "int8" if bits == 8 else "int4"
    rows, cols = keep.shape
    spec = QuantSpec(bits, group_blocks, levels)
    if codes.shape != (rows, cols // 64, 64 * (pattern.keep if pattern else 1) // (pattern.group if pattern else 1)):
        raise UserError(f"codes of shape {tuple(codes.shape)} do not fit a {rows}x{cols} {pattern or 'dense'} weight")
    if int(codes.min()) < spec.qmin or int(codes.max()) > spec.qmax:
        raise UserError(f"codes outside the INT{bits} range [{spec.qmin}, {spec.qmax}]")
    table = None if levels is None else torch.tensor(levels, dtype=torch.int8)
    if table is not None and not bool(torch.isin(codes.long(), table.long()).all()):
        raise UserError("codes that are not levels of the given INT4 table")
    mask = None if pattern is None else pack_bits(keep)
    b = None if bias is None else bias.detach().float().contiguous()
    return PackedMat(kind, rows, cols, pattern, code_values(codes.to(torch.int8), kind, table), mask,
                     scales.to(torch.float16).contiguous(), b, group_blocks, table)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantizer: per 64-input block, scale max|x|/127, round half to even.
    x (T, cols) float32 -> codes int (T, cols), scales (T, cols/64)."""
    xb = x.float().reshape(x.shape[0], -1, 64)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.clamp(torch.round(xb * inv), -127, 127)
    return q.reshape(x.shape[0], -1), (amax / 127.0).squeeze(-1)


def reference_matmul(p: PackedMat, x: torch.Tensor) -> torch.Tensor:
    """y (T, rows) = x (T, cols) W^T (+ bias) with the kernels' arithmetic, in float64 sums."""
    x = x.float()
    if p.kind == "fp32":
        y = x.double() @ p.dense_weight().double().T
    elif p.kind == "bf16":
        y = x.to(torch.bfloat16).double() @ p.dense_weight().double().T
    else:
        q, s = quantize_activations(x)
        keep = p.kept_mask()
        wq = torch.zeros(p.rows, p.cols, dtype=torch.float64)
        wq[keep] = p.codes().reshape(-1).double()
        ws = p.scales.float().repeat_interleave(p.group_blocks, 1)[:, : p.cols // 64]  # (rows, blocks)
        dots = torch.einsum("tbc,rbc->trb", q.double().reshape(x.shape[0], -1, 64), wq.reshape(p.rows, -1, 64))
        y = (dots * (s.double()[:, None, :] * ws.double()[None])).sum(-1)
    if p.bias is not None:
        y = y + p.bias.double()
    return y.float()


def native_matmul(p: PackedMat, x: torch.Tensor, isa: int, threads: int = 1) -> torch.Tensor:
    """The C kernels on x (T, cols) float32, for tests and micro-benchmarks."""
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], p.rows)
    s = p.struct()
    rc = lib().nmr_matmul(ctypes.byref(s), x.data_ptr(), x.shape[0], y.data_ptr(), isa, threads)
    if rc:
        raise RuntimeError(f"nmr_matmul failed with code {rc}")
    return y
