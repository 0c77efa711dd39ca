"""Weight matrices in the runtime's layouts, and the torch reference of what the C kernels compute.

A :class:`PackedMat` holds one Linear weight as fp32, bf16, INT8 or INT4 kept values, the N:M
bitmask (absent when dense) and, for the integer kinds, fp16 scales per group of 64-input blocks
(layouts: the header of ``csrc/nmkit_runtime.c``). :func:`reference_matmul` is the pure-torch
statement of the kernels' arithmetic, which the tests hold every ISA path to.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch

from nmkit.errors import UserError
from nmkit.formats.nm import pack_bits, unpack_bits
from nmkit.patterns import NM
from nmkit.quant import QuantSpec, dequantize, quantize_kept
from nmkit.quant.nm_quant import units_hold
from nmkit.runtime.native import KINDS, MatStruct, lib
from nmkit.solvers.nm import nm_mask

SUPPORTED_GROUPS = (2, 4, 8, 16)
MAX_COLUMNS = 65536  # the quantized row loop's chunk table (Q_MAX_CHUNKS in the C file)


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
    _tables: tuple[torch.Tensor | None, torch.Tensor | None] | None = field(default=None, init=False, repr=False)
    levels: torch.Tensor | None = None  # int4 only: int8 (16,) table, nibble n stands for levels[n] (else n - 8)
    _tiles: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def keep(self) -> int:
        return self.pattern.keep if self.pattern else 1

    @property
    def group(self) -> int:
        return self.pattern.group if self.pattern else 1

    @property
    def tiled(self) -> bool:
        """fp32 and bf16 sparse matrices store values in tiles of 16 rows (see :func:`tile_values`)."""
        sparse = self.pattern is not None and self.keep < self.group
        return self.kind in ("fp32", "bf16") and sparse

    @property
    def by_pairs(self) -> bool:
        """1:4 and 2:4: positions as 2-bit fields per group of 4 (else 4 bits per kept value)."""
        return self.group == 4 and self.keep in (1, 2)

    @property
    def k64(self) -> int:
        return 64 * self.keep // self.group

    def nbytes(self) -> int:
        """Bytes the decode kernel reads for one token (values, mask or positions, scales, code sums, bias,
        level table)."""
        tiles = self.decode_tiles()
        if tiles is not None:
            parts = (tiles, self.bias, self.levels)
        else:
            wsum, index = self.decode_tables()
            parts = (self.values, self.mask if index is None else index, self.scales, wsum, self.bias, self.levels)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def decode_tables(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the decode kernels read besides values, mask and scales, derived once: the integer kinds'
        per-block code sums (int16, rows x blocks) and, for integer 1:4 and 2:4, the kept values' 2-bit
        positions in their groups of 4 (the gather by position)."""
        if self._tables is None:
            wsum = index = None
            group4 = self.pattern is not None and self.pattern.group == 4
            if self.tiled:
                kept = self.kept_mask()
                index = tile_positions(kept, self.keep) if self.by_pairs else tile_nibbles(kept)
            if self.kind in ("int8", "int4"):
                wsum = self.codes().sum(-1, dtype=torch.int32).to(torch.int16).contiguous()
                if group4 and self.pattern.keep in (1, 2):
                    units = self.values.shape[1] // (32 if self.kind == "int4" else 64)
                    index = position_fields(self.kept_mask(), units)
            self._tables = (wsum, index)
        return self._tables

    @property
    def quant_tiled(self) -> bool:
        """Integer kinds that decode from tiles of 16 rows (see :func:`quant_tiles`): dense, and patterns
        keeping 4 or 8 of every 16 inputs (1:4, 2:4, 2:8, 4:8, 4:16, 8:16, 1:2)."""
        return self.kind in ("int8", "int4") and (self.pattern is None or self.k64 in (16, 32))

    def decode_tiles(self) -> torch.Tensor | None:
        """The integer kinds' decode stream (:func:`quant_tiles`), derived once; None for other kinds."""
        if self._tiles is None and self.quant_tiled:
            self._tiles = quant_tiles(self)
        return self._tiles

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the kernels may read, derived tables included."""
        self.decode_tables()
        self.decode_tiles()
        parts = (self.values, self.mask, self.scales, self.bias, self.levels, *self._tables, self._tiles)
        return [t for t in parts if t is not None]

    def relocate(self, place) -> None:
        """Replace every tensor of :meth:`tensors` by ``place(tensor)`` (a copy elsewhere, e.g. an arena)."""
        self.tensors()

        def moved(t):
            return None if t is None else place(t)

        self.values, self.mask, self.scales = moved(self.values), moved(self.mask), moved(self.scales)
        self.bias, self.levels = moved(self.bias), moved(self.levels)
        self._tables = tuple(moved(t) for t in self._tables)
        self._tiles = moved(self._tiles)

    def struct(self) -> MatStruct:
        def ptr(t):
            return None if t is None else t.data_ptr()

        wsum, index = self.decode_tables()
        return MatStruct(KINDS[self.kind], self.rows, self.cols, self.keep, self.group, self.group_blocks,
                         ptr(self.values), ptr(self.mask), ptr(self.scales), ptr(self.bias), ptr(wsum), ptr(index),
                         ptr(self.levels), ptr(self.decode_tiles()))

    def kept_mask(self) -> torch.Tensor:
        if self.mask is None:
            return torch.ones(self.rows, self.cols, dtype=torch.bool)
        return unpack_bits(self.mask, self.cols)

    def kept_values(self) -> torch.Tensor:
        """float32 (rows, kept per row), dequantized for the integer kinds."""
        if self.tiled:
            return untile_values(self.values, self.rows, self.cols // self.group * self.keep).float()
        if self.kind == "fp32":
            return self.values
        if self.kind == "bf16":
            return self.values.float()
        return dequantize(self.codes(), self.scales, self.group_blocks).reshape(self.rows, -1)

    @property
    def kept_per_row(self) -> int:
        return self.cols // 64 * self.k64

    def codes(self) -> torch.Tensor:
        """int8 (rows, blocks, k64) integer codes of the integer kinds."""
        symbols = unit_symbols(self.values, self.kind, self.kept_per_row)
        if self.kind == "int4":
            symbols = (symbols.long() - 8 if self.levels is None else self.levels.long()[symbols.long()]).to(torch.int8)
        return symbols.reshape(self.rows, self.cols // 64, self.k64)

    def dense_weight(self) -> torch.Tensor:
        """float32 (rows, cols): the weight these kernels multiply by."""
        w = torch.zeros(self.rows, self.cols)
        w[self.kept_mask()] = self.kept_values().reshape(-1)
        return w


def tile_values(kept: torch.Tensor) -> torch.Tensor:
    """Kept values (rows, kept per row) in tiles of 16 rows, zero-padded to whole tiles, flat: value k of
    row r at (r // 16 * kept_per_row + k) * 16 + r % 16, so one vector holds 16 rows' value k. bf16
    interleaves each pair of vectors (k even, k + 1) for vpunpcklwd / vpunpckhwd: lane l of vector k at
    word 8 * (l // 4) + 4 * (k % 2) + l % 4 of the pair's 32."""
    rows, kr = kept.shape
    padded = torch.cat([kept, kept.new_zeros(-rows % 16, kr)])
    tiled = padded.reshape(-1, 16, kr).transpose(1, 2)  # tile, k, lane
    if kept.dtype == torch.bfloat16:
        tiled = tiled.reshape(-1, kr // 2, 2, 4, 4).permute(0, 1, 3, 2, 4)  # tile, pair, l // 4, k % 2, l % 4
    return tiled.contiguous().reshape(-1)


def untile_values(values: torch.Tensor, rows: int, kept_per_row: int) -> torch.Tensor:
    """The inverse of :func:`tile_values`."""
    if values.dtype == torch.bfloat16:
        values = values.reshape(-1, kept_per_row // 2, 4, 2, 4).permute(0, 1, 3, 2, 4)
    return values.reshape(-1, kept_per_row, 16).transpose(1, 2).reshape(-1, kept_per_row)[:rows].contiguous()


def tile_positions(keep: torch.Tensor, n: int) -> torch.Tensor:
    """The 2-bit positions of an n:4 mask (n = 1, 2) in tile order, as the tiled fp32 kernel reads them:
    int32 word ((r // 16 * cols/64 + c) * n + s) * 16 + r % 16 holds slot s of groups 16c..16c+15 of row r,
    group 16c + j at bits 2j (a flat int32 tensor; the words are unsigned bit fields)."""
    rows, cols = keep.shape
    pos = (torch.nonzero(keep)[:, 1] % 4).reshape(rows, cols // 64, 16, n)  # row, chunk, group, slot
    pos = torch.cat([pos, pos.new_zeros(-rows % 16, *pos.shape[1:])])
    words = (pos << (2 * torch.arange(16)).reshape(1, 1, 16, 1)).sum(2)  # row, chunk, slot
    words = words.reshape(-1, 16, cols // 64, n).permute(0, 2, 3, 1).reshape(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def tile_nibbles(keep: torch.Tensor) -> torch.Tensor:
    """Each kept value's column within its 16 inputs (4 bits; M divides 16), in the row's kept order, as
    the tiled kernel for M != 4 reads them: int32 word (r // 16 * W + w) * 16 + r % 16 holds values
    8w..8w+7 of row r, value 8w + i at bits 4i (W = ceil(kept per row / 8); a flat int32 tensor whose
    words are unsigned bit fields)."""
    rows, cols = keep.shape
    pos = (torch.nonzero(keep)[:, 1] % 16).reshape(rows, -1)  # row, kept value
    pos = torch.cat([pos, pos.new_zeros(rows, -pos.shape[1] % 8)], dim=1)
    pos = torch.cat([pos, pos.new_zeros(-rows % 16, pos.shape[1])])
    words = (pos.reshape(pos.shape[0], -1, 8) << (4 * torch.arange(8))).sum(-1)  # row, word
    words = words.reshape(-1, 16, words.shape[1]).transpose(1, 2).reshape(-1)  # tile, word, lane
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _fields(pos: torch.Tensor, width: int = 2) -> torch.Tensor:
    """``width``-bit fields (..., 64) -> (..., 8 * width) bytes, field i in qword (i/8) % width at bit
    width * ((i / (8 * width)) * 8 + i % 8): the order in which one vpmultishiftqb over the broadcast
    8 * width bytes lines field i up with byte i (2-bit pair positions, 4-bit nibble columns)."""
    i = torch.arange(64)
    bit = 64 * ((i // 8) % width) + width * ((i // (8 * width)) * 8 + i % 8)
    packed = torch.zeros(*pos.shape[:-1], 8 * width, dtype=torch.int64)
    packed.scatter_add_(-1, (bit // 8).expand(pos.shape), pos.long() << (bit % 8))
    return packed.to(torch.uint8)


def _mask8_fields(keep: torch.Tensor) -> torch.Tensor:
    """(tiles, nb, 16 rows, 64 inputs) kept bits -> (tiles, nb, 8 vectors, 16) bytes: for vector j the 16
    rows' bit masks of inputs 8j..8j+7 (row r's byte at r, input 8j + b at bit b): read as two uint64,
    the masks under which vpcompressb packs 8 rows' kept input indices."""
    bits = keep.reshape(*keep.shape[:3], 8, 8).long() << torch.arange(8)
    return bits.sum(-1).transpose(2, 3).to(torch.uint8)


def quant_tiles(p: PackedMat) -> torch.Tensor:
    """The integer kinds' decode stream, uint8: for each tile of 16 rows (the last zero-padded) and each
    64-input block, 32 bytes of fp16 weight scales (one per row, repeated over group_blocks), 32 bytes of
    int16 code sums, then for sparse rows the positions (1:4 and 2:4: in the group of 4, 16 bytes per
    vector, :func:`_fields`; 4:8 and 1:2 (4 of every 8 inputs): bit masks, 16 bytes per vector,
    :func:`_mask8_fields`; else in the window of 16 inputs, 32 bytes per vector, 4-bit :func:`_fields`),
    then the codes: k64/4 vectors of 64 bytes, vector j holding for each row (dword lane) its kept values 4j..4j+3
    of the block, so window w (inputs 16w..16w+15) is vectors w*k64/64 .. (w+1)*k64/64 - 1. INT8: the codes;
    INT4: vector pairs in one 64 bytes, the even one in the low nibbles (codes + 8, or level indices)."""
    rows, nb, k64 = p.rows, p.cols // 64, p.k64
    pad = -rows % 16
    tiles = (rows + pad) // 16

    def tiled(t: torch.Tensor) -> torch.Tensor:  # (rows, nb, ...) -> (tiles, nb, 16, ...)
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
        return t.reshape(tiles, 16, *t.shape[1:]).transpose(1, 2)

    scales = p.scales.repeat_interleave(p.group_blocks, 1)[:, :nb].contiguous()
    wsum = p.decode_tables()[0]
    parts = [tiled(scales).contiguous().view(torch.uint8).reshape(tiles, nb, 32),
             tiled(wsum).contiguous().view(torch.uint8).reshape(tiles, nb, 32)]

    def vectors(t: torch.Tensor) -> torch.Tensor:  # (rows, nb, k64) -> (tiles, nb, k64/4 vectors, 64)
        return tiled(t.reshape(rows, nb, k64 // 4, 4)).permute(0, 1, 3, 2, 4).reshape(tiles, nb, k64 // 4, 64)

    if p.pattern is not None and p.by_pairs:
        pos = (torch.nonzero(p.kept_mask())[:, 1] % 4).reshape(rows, nb, k64)
        parts.append(_fields(vectors(pos)).reshape(tiles, nb, -1))
    elif p.pattern is not None and k64 == 32 and 8 % p.group == 0:  # 4:8, 1:2
        parts.append(_mask8_fields(tiled(p.kept_mask().reshape(rows, nb, 64))).reshape(tiles, nb, -1))
    elif p.pattern is not None:
        pos = (torch.nonzero(p.kept_mask())[:, 1] % 16).reshape(rows, nb, k64)
        parts.append(_fields(vectors(pos), 4).reshape(tiles, nb, -1))
    codes = p.codes()
    if p.kind == "int8":
        parts.append(vectors(codes).view(torch.uint8).reshape(tiles, nb, -1))
    else:
        nib = codes.long() + 8 if p.levels is None else torch.searchsorted(p.levels.long(), codes.long().contiguous())
        v = vectors(nib).reshape(tiles, nb, k64 // 8, 2, 64)
        parts.append((v[:, :, :, 0] | (v[:, :, :, 1] << 4)).to(torch.uint8).reshape(tiles, nb, -1))
    return torch.cat(parts, dim=-1).reshape(-1).contiguous()


def position_fields(keep: torch.Tensor, units: int) -> torch.Tensor:
    """The 2-bit position in its group of 4 of every kept value, 16 bytes per 64-value unit (uint8,
    rows x units*16), in the order the C gather reads them (``q_unit_x_index``): value i of a unit
    sits in qword (i/8) % 2 at bit 2 * ((i/16) * 8 + i % 8). Padding values get position 0."""
    rows = keep.shape[0]
    pos = (torch.nonzero(keep)[:, 1] % 4).reshape(rows, -1)
    pos = torch.cat([pos, pos.new_zeros(rows, units * 64 - pos.shape[1])], dim=1).reshape(rows, units, 64)
    return _fields(pos).reshape(rows, -1).contiguous()


def _check_shape(name: str, weight: torch.Tensor, pattern: NM | None) -> None:
    if weight.dim() != 2:
        raise UserError(f"{name}: the runtime packs 2-d Linear weights, got shape {tuple(weight.shape)}")
    if weight.shape[1] % 64:
        raise UserError(f"{name}: the runtime needs in_features divisible by 64, got {weight.shape[1]}")
    if weight.shape[1] > MAX_COLUMNS:
        raise UserError(f"{name}: the runtime packs at most {MAX_COLUMNS} in_features, got {weight.shape[1]}")
    if pattern is not None and pattern.group not in SUPPORTED_GROUPS:
        raise UserError(f"{name}: pattern {pattern} is not supported by the runtime (M must be one of "
                        f"{SUPPORTED_GROUPS}); prune to 2:4, 1:4, 2:8, 4:8 or 8:16")


def unit_pattern(pattern: NM) -> NM | None:
    """The integer kinds store 64-value units spanning 1, 2, 4 or 8 blocks of 64 inputs, so they keep 64,
    32, 16 or 8 values per 64 inputs: any other pattern (3:8, 1:16) runs as the next denser one it also
    follows (4:8, 2:16: the extra slots hold zeros); None (dense) when that is the whole group."""
    keep = pattern.keep
    while not units_hold(keep, pattern.group):
        keep += 1
    return None if keep == pattern.group else NM(keep, pattern.group)


def pack(weight: torch.Tensor, kind: str, pattern: NM | None = None, *, bias: torch.Tensor | None = None,
         group_blocks: int = 1, importance: torch.Tensor | None = None, name: str = "weight") -> PackedMat:
    """Pack a (rows, cols) weight. ``pattern``: the N:M it already follows (zeros where pruned), or
    None for dense. ``importance``: optional per-input weights (cols,) for the integer kinds' scales."""
    if kind not in KINDS:
        raise UserError(f"unknown weight kind {kind!r}: choose one of {', '.join(KINDS)}")
    _check_shape(name, weight, pattern)
    w = weight.detach().float().contiguous()
    rows, cols = w.shape
    if kind in ("int8", "int4") and pattern is not None:
        pattern = unit_pattern(pattern)
    if pattern is None:
        kept, mask = w, None
    else:
        keep = nm_mask((w != 0).float() + w.abs(), pattern)  # nonzeros first, ties by index
        if bool((w[~keep] != 0).any()):
            raise UserError(f"{name}: weight does not follow {pattern} (a group has more than "
                            f"{pattern.keep} non-zeros); prune it first")
        kept, mask = w[keep].reshape(rows, -1), pack_bits(keep)
    b = None if bias is None else bias.detach().float().contiguous()
    p = PackedMat(kind, rows, cols, pattern, kept, mask, bias=b, group_blocks=group_blocks)
    if p.tiled:
        p.values = tile_values(kept.to(torch.bfloat16) if kind == "bf16" else kept)
    elif kind == "bf16":
        p.values = kept.to(torch.bfloat16).contiguous()
    elif kind in ("int8", "int4"):
        nb = cols // 64
        imp = None
        if importance is not None:
            imp = importance.float().expand(rows, cols)
            imp = (imp if pattern is None else imp[keep]).reshape(rows, nb, p.k64)
        codes, scales = quantize_kept(kept.reshape(rows, nb, p.k64), QuantSpec(8 if kind == "int8" else 4,
                                                                                 group_blocks), imp)
        p.scales = scales
        p.values = code_values(codes, kind)
    return p


def code_values(codes: torch.Tensor, kind: str, levels: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes (rows, blocks, k64) -> the values layout of ``kind`` (int8 or int4), whole 64-value units.
    With ``levels`` (int4), each code is stored as its index in the table (padding: index 0)."""
    flat = codes.reshape(codes.shape[0], -1)
    if kind == "int8":
        return symbol_units(flat, kind)
    if levels is None:
        nibbles = flat.long() + 8
    else:
        nibbles = torch.searchsorted(levels.long(), flat.long().contiguous())
    return symbol_units(nibbles.to(torch.uint8), kind, levels is not None)


def pad_symbol(kind: str, has_levels: bool) -> int:
    """What fills each row's last unit: code 0 (INT8), nibble 8 (INT4: code 0) or table index 0."""
    return 8 if kind == "int4" and not has_levels else 0


def symbol_units(symbols: torch.Tensor, kind: str, has_levels: bool = False) -> torch.Tensor:
    """Stored symbols (rows, kept per row: int8 codes, or INT4 nibbles as uint8) -> the runtime's values
    layout: whole 64-value units per row, the last one padded; INT4 packs symbol j of a unit in the low
    nibble of byte j and symbol j + 32 in its high nibble."""
    rows = symbols.shape[0]
    pad = symbols.new_full((rows, -symbols.shape[1] % 64), pad_symbol(kind, has_levels))
    units = torch.cat([symbols, pad], dim=1)
    if kind == "int8":
        return units.contiguous()
    u = units.reshape(rows, -1, 64)
    return (u[..., :32] | (u[..., 32:] << 4)).reshape(rows, -1).contiguous()


def unit_symbols(values: torch.Tensor, kind: str, kept_per_row: int) -> torch.Tensor:
    """The inverse of :func:`symbol_units`: (rows, kept per row) int8 codes or INT4 nibbles (uint8)."""
    rows = values.shape[0]
    if kind == "int4":
        u = values.reshape(rows, -1, 32)
        values = torch.cat([u & 15, u >> 4], dim=-1).reshape(rows, -1)
    return values[:, :kept_per_row]


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
