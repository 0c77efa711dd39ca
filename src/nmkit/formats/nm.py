"""The canonical compressed N:M layout: kept values plus one mask bit per dense weight.

For a 2-D weight (rows, cols) with groups of M along ``cols`` (the reduction dim of ``nn.Linear``):

* ``values``: (rows, kp * N / M), the kept weights of each row in increasing column order;
* ``mask``: uint8 (rows, kp / 8); bit j (LSB first) of byte b is column 8b + j, the same bit order
  as ``numpy.packbits(..., bitorder="little")``. Two bytes are the mask of 16 fp32 columns (one
  ``vexpandps``), four bytes of 32 bf16 columns (one ``vpexpandw``).

``kp`` is ``cols`` rounded up to a multiple of lcm(32, M); the padding columns keep the first N of
each group with value 0, so every group keeps exactly N and a kernel knows where each 16-column
chunk's values start. Groups with fewer than N non-zeros store explicit zeros (as in
compressed-tensors' sparse-24-bitmask), so the round trip dense -> compressed -> dense is exact.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from nmkit.patterns import NM, PatternError

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def padded_cols(cols: int, group: int) -> int:
    """Columns after padding: a multiple of lcm(32, M) so fp32 and bf16 kernels see whole chunks."""
    step = math.lcm(32, group)
    return -(-cols // step) * step


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool (..., K) with K % 8 == 0 -> uint8 (..., K/8), little bit order."""
    if mask.device.type == "cpu":  # numpy's packbits is ~20x faster than a torch reduction over 8
        return torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    m = mask.reshape(*mask.shape[:-1], mask.shape[-1] // 8, 8).to(torch.uint8)
    return (m * _BITS.to(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """uint8 (..., K/8) -> bool (..., K) (or the first ``count`` columns), little bit order."""
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.numpy(), axis=-1, count=count, bitorder="little")
        return torch.from_numpy(bits).to(torch.bool)
    bits = (packed.unsqueeze(-1) & _BITS.to(packed.device)) != 0
    out = bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)
    return out if count is None else out[..., :count]


@functools.cache
def _byte_lut(n: int, m: int) -> np.ndarray:
    """For M dividing 8: bool[256], whether every M-bit field of the byte has exactly N bits set."""
    fields = [[bin((b >> (k * m)) & ((1 << m) - 1)).count("1") == n for k in range(8 // m)] for b in range(256)]
    return np.array([all(f) for f in fields])


_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def _keeps_exactly(packed: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of M bits of a packed mask (uint8, little bit order) has exactly N set.
    On CPU, M dividing 8 or a multiple of 8: byte lookup tables, no unpacking."""
    if packed.device.type == "cpu" and (8 % m == 0 or m % 8 == 0):
        b = packed.contiguous().numpy()
        if 8 % m == 0:
            return bool(_byte_lut(n, m)[b].all())
        counts = _POPCOUNT[b].reshape(-1, m // 8).sum(-1, dtype=np.int32)
        return bool((counts == n).all())
    rows = packed.shape[0]
    return bool((unpack_bits(packed).reshape(rows, -1, m).sum(-1) == n).all())


@dataclass
class NMTensor:
    """A 2-D weight in the canonical compressed N:M layout (see module docstring)."""

    values: torch.Tensor
    mask: torch.Tensor
    shape: tuple[int, int]
    pattern: NM

    @property
    def kp(self) -> int:
        return self.mask.shape[-1] * 8

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def p16(self) -> int:
        """Kept values per 16 columns (an integer only when M divides 16)."""
        return 16 * self.pattern.keep // self.pattern.group

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.mask.numel()

    def validate(self) -> None:
        """Raise :class:`PatternError` if the buffers are inconsistent with shape and pattern."""
        rows, cols = self.shape
        n, m = self.pattern.keep, self.pattern.group
        kp = padded_cols(cols, m)
        if self.mask.dtype != torch.uint8 or tuple(self.mask.shape) != (rows, kp // 8):
            raise PatternError(f"mask must be uint8 of shape {(rows, kp // 8)}, got {self.mask.dtype} "
                               f"{tuple(self.mask.shape)}")
        if tuple(self.values.shape) != (rows, kp * n // m):
            raise PatternError(
                f"values must have shape {(rows, kp * n // m)}, got {tuple(self.values.shape)}"
            )
        if not _keeps_exactly(self.mask, n, m):
            raise PatternError(f"mask must keep exactly {n} of every {m} columns (N:M = keep N of M)")

    def to_dense(self) -> torch.Tensor:
        return decompress(self)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _select(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w[mask]`` (flat, row-major order), bit for bit. On CPU through ``numpy.compress`` on an
    integer view of the same width: 6-8x faster than torch's boolean indexing."""
    if w.device.type != "cpu" or w.element_size() not in _INT_OF_SIZE:
        return w[mask]
    w = w.contiguous()
    bits = w.view(_INT_OF_SIZE[w.element_size()])
    picked = np.compress(mask.contiguous().numpy().reshape(-1), bits.numpy().reshape(-1))
    return torch.from_numpy(picked).view(w.dtype)


def _rank_groups(w: torch.Tensor, n: int) -> torch.Tensor:
    """Bool (groups, M) keeping N per group: the non-zeros, then -0.0, then +0.0, lowest index first.

    Used only for the groups that do not already hold exactly N non-zeros (usually few)."""
    nonzero = w != 0
    # -0.0 ranks between a real non-zero and +0.0 so it survives the round trip when there is room.
    negzero = (~nonzero) & torch.signbit(w) if w.is_floating_point() else torch.zeros_like(nonzero)
    score = nonzero.to(torch.int8) * 2 + negzero.to(torch.int8)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order, True)


def compress(weight: torch.Tensor, pattern: NM | str, mask: torch.Tensor | None = None) -> NMTensor:
    """Compress a 2-D weight that already follows ``pattern`` (keep N of every M along dim -1).

    Without ``mask`` the kept positions are the non-zeros (plus the lowest-index zeros of groups
    with fewer than N, ``-0.0`` before ``+0.0``), and a group with more than N non-zeros is an
    error. With ``mask`` (exactly N per group) the weights outside it are dropped.
    """
    pattern = NM.parse(pattern)
    n, m = pattern.keep, pattern.group
    if weight.dim() != 2:
        raise PatternError(f"compress expects a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % m:
        raise PatternError(
            f"in_features={cols} is not divisible by M={m} (pattern {pattern}: keep {n} of {m})"
        )
    w = weight.detach().contiguous()
    if mask is None:
        # The common case (a solver's output) has exactly N non-zeros in every group: the mask is
        # the non-zeros. Only the other groups are ranked.
        mask = w != 0
        groups = mask.view(-1, m)
        bad = groups.sum(-1, dtype=torch.int32) != n
        if bool(bad.any()):
            sel = bad.nonzero().squeeze(1)
            sub_w = w.view(-1, m)[sel]
            sub = _rank_groups(sub_w, n)
            lost = (sub_w != 0) & ~sub
            if bool(lost.any()):
                i, j = (int(v) for v in lost.nonzero()[0])
                g = int(sel[i])
                r, c = g // (cols // m), (g % (cols // m)) * m + j
                raise PatternError(
                    f"weight does not follow {pattern} (keep {n} of every {m}): row {r}, columns "
                    f"{c - c % m}..{c - c % m + m - 1} have more than {n} non-zeros; prune it first"
                )
            groups[sel] = sub
    else:
        mask = mask.to(torch.bool)
        if tuple(mask.shape) != (rows, cols):
            raise PatternError(f"mask shape {tuple(mask.shape)} does not match weight shape {(rows, cols)}")
        if not bool((mask.reshape(rows, cols // m, m).sum(-1) == n).all()):
            raise PatternError(f"mask must keep exactly {n} of every {m} weights (pattern {pattern})")
    kp = padded_cols(cols, m)
    if kp > cols:
        pad_mask = torch.zeros(rows, (kp - cols) // m, m, dtype=torch.bool, device=w.device)
        pad_mask[..., :n] = True
        mask = torch.cat([mask, pad_mask.reshape(rows, kp - cols)], dim=1)
        w = torch.cat([w, torch.zeros(rows, kp - cols, dtype=w.dtype, device=w.device)], dim=1)
    values = _select(w, mask).reshape(rows, kp * n // m)
    return NMTensor(values=values, mask=pack_bits(mask).contiguous(), shape=(rows, cols), pattern=pattern)


def zeros(shape: tuple[int, int], pattern: NM | str, dtype: torch.dtype = torch.float32,
          device: torch.device | str | None = None) -> NMTensor:
    """An all-zero weight in the canonical layout (every group keeps its first N slots): the same
    bytes as ``compress(torch.zeros(shape), pattern)``, without the ranking."""
    pattern = NM.parse(pattern)
    n, m = pattern.keep, pattern.group
    rows, cols = shape
    if cols % m:
        raise PatternError(
            f"in_features={cols} is not divisible by M={m} (pattern {pattern}: keep {n} of {m})"
        )
    kp = padded_cols(cols, m)
    row = torch.zeros(kp // m, m, dtype=torch.bool)
    row[:, :n] = True
    mask = pack_bits(row.reshape(1, kp)).expand(rows, kp // 8).contiguous()
    values = torch.zeros(rows, kp * n // m, dtype=dtype, device=device)
    return NMTensor(values=values, mask=mask.to(values.device), shape=(rows, cols), pattern=pattern)


def decompress(t: NMTensor) -> torch.Tensor:
    """Dense (rows, cols) weight with zeros at pruned positions; exact inverse of :func:`compress`."""
    rows, cols = t.shape
    mask = unpack_bits(t.mask)
    v = t.values
    if v.device.type == "cpu" and v.element_size() in _INT_OF_SIZE:  # numpy put: ~4x torch's index_put
        ints = _INT_OF_SIZE[v.element_size()]
        out = np.zeros((rows, t.kp), dtype=torch.empty(0, dtype=ints).numpy().dtype)
        np.put(out, np.flatnonzero(mask.numpy()), v.contiguous().view(ints).numpy().reshape(-1))
        return torch.from_numpy(np.ascontiguousarray(out[:, :cols])).view(v.dtype)
    out = torch.zeros(rows, t.kp, dtype=v.dtype, device=v.device)
    out[mask] = v.reshape(-1)
    return out[:, :cols].contiguous()
