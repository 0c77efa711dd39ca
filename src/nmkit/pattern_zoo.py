"""Patterns beyond row-wise N:M: transposable, V:N:M, hierarchical N:M, balanced (bank), tile-wise.

Same conventions as :mod:`nmkit.patterns`: "N:M" keeps N of every M; groups run along the last
(reduction) dimension of a (..., rows, cols) tensor; every pattern validates a mask
(:meth:`is_valid`, non-zeros count as kept) and projects scores onto itself (:meth:`project`).
Solvers live in :mod:`nmkit.solvers`; this module only says what a valid mask looks like.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from nmkit.patterns import MAX_GROUP, NM, NM_HELP, PatternError, TailPolicy, groups_keep_at_most, keep_count


def _as_2d(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Bool view with the grouped dim last and everything else folded into rows (batch dims kept)."""
    m = mask.movedim(dim, -1) != 0
    if m.dim() < 2:
        raise PatternError(f"this pattern needs a tensor with at least 2 dims, got shape {tuple(mask.shape)}")
    return m


def _tail_only_error(tail: str, name: str) -> None:
    if tail != "error":
        raise PatternError(f"{name} supports only tail='error' (shapes must be multiples of the block size)")


@dataclass(frozen=True)
class Transposable(NM):
    """N:M along rows *and* columns: every M x M tile keeps at most N per row and N per column.

    The mask of ``W`` is then N:M for ``W`` (forward, groups along ``in``) and for ``W.T``
    (backward, groups along ``out``), so both GEMMs can run sparse.
    """

    def __str__(self) -> str:
        return f"{self.keep}:{self.group}T"

    def is_valid(self, mask: torch.Tensor, dim: int = -1, tail: TailPolicy = "error", exact: bool = False) -> bool:
        """Row-wise N:M along ``dim`` and column-wise N:M along the dim before it (tiles of M x M)."""
        m = _as_2d(mask, dim)
        if tail == "error" and (m.shape[-1] % self.group or m.shape[-2] % self.group):
            return False
        return NM.is_valid(self, m, -1, tail, exact) and NM.is_valid(self, m, -2, tail, exact)

    def project(self, scores: torch.Tensor, dim: int = -1, tail: TailPolicy = "error") -> torch.Tensor:
        from nmkit.solvers.transposable import transposable_mask

        _tail_only_error(tail, "Transposable")
        return transposable_mask(scores.movedim(dim, -1), self).movedim(-1, dim)


@dataclass(frozen=True)
class VNM:
    """V:N:M (VENOM): in each V x M block keep 4 columns shared by its V rows, then N of those 4 per row.

    Density N/M; ``VNM(64, 2, 8)`` is 75% sparse. Written ``"64:2:8"`` (V:N:M, N kept).
    """

    v: int
    keep: int
    group: int
    columns: int = 4

    def __post_init__(self) -> None:
        if not all(isinstance(x, int) for x in (self.v, self.keep, self.group, self.columns)):
            raise PatternError("VNM(v, n, m): all of V, N, M must be integers")
        if not (self.v >= 1 and 1 <= self.keep < self.columns <= self.group <= 256):
            raise PatternError(
                f"invalid V:N:M pattern {self.v}:{self.keep}:{self.group}: need V >= 1 and "
                f"1 <= N < {self.columns} <= M <= 256 (N kept per row among {self.columns} kept columns per "
                f"V x M block), e.g. '64:2:8' keeps 2 of every 8 (75% sparse). {NM_HELP}"
            )

    @property
    def density(self) -> float:
        return self.keep / self.group

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __str__(self) -> str:
        return f"{self.v}:{self.keep}:{self.group}"

    def is_valid(self, mask: torch.Tensor, dim: int = -1, tail: TailPolicy = "error", exact: bool = False) -> bool:
        """Each V x M block uses at most ``columns`` columns and each row at most N entries of the block."""
        _tail_only_error(tail, "VNM")
        m = _as_2d(mask, dim)
        r, c = m.shape[-2:]
        if r % self.v or c % self.group:
            return False
        blocks = m.reshape(*m.shape[:-2], r // self.v, self.v, c // self.group, self.group)
        cols_used = blocks.any(-3).sum(-1)  # (..., R/V, C/M)
        per_row = blocks.sum(-1)  # (..., R/V, V, C/M)
        if exact:
            return bool((per_row == self.keep).all()) and bool((cols_used <= self.columns).all())
        return bool((per_row <= self.keep).all()) and bool((cols_used <= self.columns).all())

    def project(self, scores: torch.Tensor, dim: int = -1, tail: TailPolicy = "error") -> torch.Tensor:
        from nmkit.solvers.vnm import vnm_mask

        _tail_only_error(tail, "VNM")
        return vnm_mask(scores.movedim(dim, -1), self).movedim(-1, dim)


def _compacted_slots(active: torch.Tensor, rows_mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per tile: fewest kept-column slots that hold the active columns with every row N:M.

    ``active`` (T, C) bool: columns used by the tile; ``rows_mask`` (T, V, C). Greedy, columns in
    order: a column opens a new group of M slots when the current group is full or some row would
    exceed N (the skipped slots hold all-zero kept columns). Greedy is optimal here because any run
    that fits still fits when shortened.
    """
    t, v, c = rows_mask.shape
    order = torch.sort((~active).to(torch.uint8), dim=-1, stable=True).indices  # active columns first
    n_active = active.sum(-1)
    gathered = torch.gather(rows_mask, 2, order.unsqueeze(1).expand(t, v, c))
    used = torch.zeros(t, dtype=torch.long)
    in_group = torch.zeros(t, dtype=torch.long)
    counts = torch.zeros(t, v, dtype=torch.long)
    for k in range(int(n_active.max()) if t else 0):
        live = k < n_active
        col = gathered[:, :, k].long()
        new_group = (in_group == m) | ((counts + col) > n).any(-1)
        start = live & new_group
        used = torch.where(start & (in_group > 0), used + (m - in_group), used)
        in_group = torch.where(start, 0, in_group)
        counts = torch.where(start.unsqueeze(-1), 0, counts)
        in_group = in_group + live.long()
        used = used + live.long()
        counts = counts + col * live.unsqueeze(-1).long()
    return used


@dataclass(frozen=True)
class HiNM:
    """Hierarchical N:M: per tile of V rows keep ``vec_keep`` whole column vectors, then N:M on them.

    The column vectors may sit anywhere in the row range (unlike V:N:M's 4-per-block); inside the
    compacted tile (kept columns in order) every row is N:M. Density ``vec_keep_frac * N / M``.
    """

    v: int
    vec_density: float
    inner: NM = NM(2, 4)

    def __post_init__(self) -> None:
        if not (isinstance(self.v, int) and self.v >= 1 and 0.0 < self.vec_density <= 1.0):
            raise PatternError(f"HiNM needs V >= 1 and a vector density in (0, 1], got {self.v}, {self.vec_density}")

    def kept_vectors(self, cols: int) -> int:
        """Column vectors kept per tile: a multiple of M (at least M)."""
        m = self.inner.group
        return max(m, int(cols * self.vec_density + 1e-9) // m * m)

    @property
    def density(self) -> float:
        return self.vec_density * self.inner.density

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __str__(self) -> str:
        return f"hinm{self.v}:{self.vec_density * 100:g}%:{self.inner}"

    def is_valid(self, mask: torch.Tensor, dim: int = -1, tail: TailPolicy = "error", exact: bool = False) -> bool:
        """At most ``kept_vectors`` columns per V-row tile, and each row N:M on the compacted columns."""
        _tail_only_error(tail, "HiNM")
        m = _as_2d(mask, dim)
        r, c = m.shape[-2:]
        if r % self.v or c % self.inner.group:
            return False
        tiles = m.reshape(-1, self.v, c)
        slots = self.kept_vectors(c)
        active = tiles.any(1)
        if bool((active.sum(-1) > slots).any()):
            return False
        if exact and not bool((tiles.sum(-1) == slots // self.inner.group * self.inner.keep).all()):
            return False
        return bool((_compacted_slots(active, tiles, self.inner.keep, self.inner.group) <= slots).all())

    def project(self, scores: torch.Tensor, dim: int = -1, tail: TailPolicy = "error") -> torch.Tensor:
        from nmkit.solvers.hinm import hinm_mask

        _tail_only_error(tail, "HiNM")
        return hinm_mask(scores.movedim(dim, -1), self).movedim(-1, dim)


@dataclass(frozen=True)
class Balanced:
    """Balanced (bank) sparsity: each row splits into banks of ``bank`` weights, each keeping ``keep``.

    The same rule as N:M with a large group (no 64 limit), so every bank carries the same work.
    """

    keep: int
    bank: int

    def __post_init__(self) -> None:
        if not (isinstance(self.keep, int) and isinstance(self.bank, int) and 1 <= self.keep < self.bank):
            raise PatternError(f"Balanced(keep, bank) needs 1 <= keep < bank, got {self.keep}, {self.bank}")

    @classmethod
    def from_density(cls, density: float, bank: int) -> Balanced:
        """Bank pattern that keeps ``round(density * bank)`` of each bank."""
        return cls(keep_count(bank, density), bank)

    @property
    def density(self) -> float:
        return self.keep / self.bank

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __str__(self) -> str:
        return f"balanced:{self.keep}/{self.bank}"

    def is_valid(self, mask: torch.Tensor, dim: int = -1, tail: TailPolicy = "error", exact: bool = False) -> bool:
        return groups_keep_at_most(mask, self.bank, self.keep, dim, tail, exact)

    def project(self, scores: torch.Tensor, dim: int = -1, tail: TailPolicy = "error") -> torch.Tensor:
        from nmkit.solvers.balanced import balanced_mask

        return balanced_mask(scores, self, dim=dim, tail=tail)


@dataclass(frozen=True)
class TileWise:
    """Tile-wise (TW) sparsity, and tile-vector-wise (TVW) when ``inner`` is given.

    Whole output rows are pruned first; the surviving rows form tiles of ``tile`` consecutive rows,
    and each tile keeps whole column segments, so every tile is a smaller dense GEMM. With
    ``inner`` (e.g. 2:4) each row is additionally N:M over its tile's kept columns (TVW).
    ``density`` is the overall fraction of weights kept.
    """

    tile: int
    density: float
    inner: NM | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.tile, int) and self.tile >= 1 and 0.0 < self.density <= 1.0):
            raise PatternError(f"TileWise needs tile >= 1 and density in (0, 1], got {self.tile}, {self.density}")
        if self.inner is not None and self.density > self.inner.density:
            raise PatternError(f"TileWise density {self.density} exceeds the inner pattern's {self.inner.density}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __str__(self) -> str:
        base = f"tw{self.tile}:{self.density * 100:g}%"
        return base if self.inner is None else f"{base}:{self.inner}"

    def budget(self, numel: int) -> int:
        return int(numel * self.density + 1e-9)

    def is_valid(self, mask: torch.Tensor, dim: int = -1, tail: TailPolicy = "error", exact: bool = False) -> bool:
        """Kept <= budget, and every tile (``tile`` consecutive non-empty rows) is row-set x column-set.

        With ``inner``, rows need only be N:M on their tile's column set, and the budget counts the
        dense tile work times N/M.
        """
        m = _as_2d(mask, dim)
        ok = True
        for mat in m.reshape(-1, *m.shape[-2:]):
            rows = mat[mat.any(-1)]
            r, c = rows.shape
            if r == 0:
                continue
            pad = (-r) % self.tile
            tiles = torch.cat([rows, rows.new_zeros(pad, c)]).reshape(-1, self.tile, c)
            real = torch.cat([rows.new_ones(r), rows.new_zeros(pad)]).reshape(-1, self.tile)
            union = tiles.any(1)  # (T, C)
            work = int((union.sum(-1) * real.sum(-1)).sum())
            budget = self.budget(mat.numel())
            if self.inner is None:
                full = (tiles == (union.unsqueeze(1) & real.unsqueeze(-1))).all()
                ok &= bool(full) or not exact
                ok &= work <= budget
            else:
                k, g = self.inner.keep, self.inner.group
                used = _compacted_slots(union, tiles, k, g)
                used = (used + g - 1) // g * g  # whole groups of M kept columns per tile
                fits = int((used * real.sum(-1)).sum()) * k <= budget * g
                ok &= fits and int(mat.sum()) <= budget
        return bool(ok)

    def project(self, scores: torch.Tensor, dim: int = -1, tail: TailPolicy = "error") -> torch.Tensor:
        from nmkit.solvers.balanced import tile_wise_mask

        return tile_wise_mask(scores.movedim(dim, -1), self).movedim(-1, dim)


ZooPattern = Transposable | VNM | HiNM | Balanced | TileWise

_T_RE = re.compile(r"^\s*(?:(?:transposable|t)\s+(\d+)\s*:\s*(\d+)|(\d+)\s*:\s*(\d+)\s*t)\s*$", re.I)
_VNM_RE = re.compile(r"^\s*v?(\d+)\s*:\s*(\d+)\s*:\s*(\d+)\s*$", re.I)
_BAL_RE = re.compile(r"^\s*balanced\s*:?\s*(\d+)\s*/\s*(\d+)\s*$", re.I)


def parse_zoo(spec: str) -> ZooPattern | None:
    """Parse ``"2:4T"`` / ``"transposable 2:4"``, ``"64:2:8"`` / ``"v64:2:8"`` (V:N:M, N kept) and
    ``"balanced:32/128"``; None when ``spec`` is none of these (the caller raises)."""
    if m := _T_RE.match(spec):
        a, b = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        n, g = int(a), int(b)
        if not (1 <= n < g <= MAX_GROUP):
            raise PatternError(f"invalid transposable pattern {spec!r}: {NM_HELP}")
        return Transposable(n, g)
    if m := _VNM_RE.match(spec):
        return VNM(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    if m := _BAL_RE.match(spec):
        return Balanced(int(m.group(1)), int(m.group(2)))
    return None


__all__ = ["Transposable", "VNM", "HiNM", "Balanced", "TileWise", "ZooPattern", "parse_zoo"]
