"""Sparsity patterns: what a mask must look like, independent of how it was found.

Convention used everywhere in nmkit: **"N:M" means keep N of every M consecutive weights**
(``"2:4"`` keeps 2 of 4, 50% sparse; ``"2:8"`` keeps 2 of 8, 75% sparse). Groups run along the
reduction dimension (``dim=-1`` for ``nn.Linear.weight`` of shape (out, in)).

This module only describes patterns: each one parses from a string (:func:`parse`) and validates a
mask (:meth:`is_valid`). Finding the mask that keeps the most score is the solvers' job:
:func:`nmkit.solvers.mask_for` dispatches on the pattern's type.

Row-wise N:M, unstructured and dense come first; then the patterns beyond row-wise N:M
(transposable, V:N:M, hierarchical N:M, balanced/bank, tile-wise), which group along the last
(reduction) dimension of a (..., rows, cols) tensor the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from nmkit.errors import UserError

TailPolicy = Literal["error", "pad", "dense"]
TAIL_POLICIES: tuple[str, ...] = ("error", "pad", "dense")
MAX_GROUP = 64

NM_HELP = (
    "N:M means keep N of every M consecutive weights (1 <= N < M <= 64), e.g. '2:4' keeps 2 of every 4 "
    "(50% sparse) and '2:8' keeps 2 of every 8 (75% sparse); also accepted: '50%' (unstructured, "
    "fraction of weights set to zero) and 'dense'"
)


class PatternError(UserError, ValueError):
    """A pattern string or mask that does not make sense."""


@dataclass(frozen=True)
class NM:
    """Keep ``keep`` of every ``group`` consecutive weights along the reduction dimension."""

    keep: int
    group: int

    def __post_init__(self) -> None:
        if not (isinstance(self.keep, int) and isinstance(self.group, int)):
            raise PatternError(f"NM({self.keep!r}, {self.group!r}): N and M must be integers. {NM_HELP}")
        if not (1 <= self.keep < self.group <= MAX_GROUP):
            raise PatternError(f"invalid N:M pattern {self.keep}:{self.group}. {NM_HELP}")

    @classmethod
    def parse(cls, spec: str | NM) -> NM:
        """Parse ``"N:M"`` (keep N of every M). Raises :class:`PatternError` with an example otherwise."""
        if isinstance(spec, NM):
            return spec
        pattern = parse(spec)
        if not isinstance(pattern, NM):  # a valid pattern, just not N:M: say so rather than call it invalid
            raise PatternError(f"{spec!r} is a valid pattern ({type(pattern).__name__}) but not N:M, which is "
                               "needed here: give N:M such as '2:4' (keep 2 of every 4) or '2:8'")
        return pattern

    @property
    def density(self) -> float:
        return self.keep / self.group

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __str__(self) -> str:
        return f"{self.keep}:{self.group}"

    def is_valid(self, mask: torch.Tensor, dim: int = -1, tail: TailPolicy = "error", exact: bool = False) -> bool:
        """True when every group of ``group`` along ``dim`` has at most ``keep`` non-zeros.

        ``mask`` may be a boolean mask or a weight tensor (non-zeros count as kept). ``exact=True``
        requires exactly ``keep`` per full group, as solvers produce.
        """
        return groups_keep_at_most(mask, self.group, self.keep, dim, tail, exact)


@dataclass(frozen=True)
class Unstructured:
    """Unstructured sparsity: zero the ``sparsity`` fraction of smallest scores along each row of ``dim``."""

    sparsity: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.sparsity < 1.0):
            raise PatternError(f"unstructured sparsity must be in [0, 100)%, got {self.sparsity:.2%}. {NM_HELP}")

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def __str__(self) -> str:
        return f"{self.sparsity * 100:g}%"

    def is_valid(self, mask: torch.Tensor, dim: int = -1, tail: TailPolicy = "error", exact: bool = False) -> bool:
        """True when each row along ``dim`` keeps at most ``round(density * len)`` entries."""
        m = mask.movedim(dim, -1) != 0
        allowed = keep_count(m.shape[-1], self.density)
        counts = m.sum(-1)
        return bool((counts == allowed).all()) if exact else bool((counts <= allowed).all())


@dataclass(frozen=True)
class Dense:
    """No sparsity: every weight is kept."""

    density: float = 1.0
    sparsity: float = 0.0

    def __str__(self) -> str:
        return "dense"

    def is_valid(self, mask: torch.Tensor, dim: int = -1, tail: TailPolicy = "error", exact: bool = False) -> bool:
        return bool((mask != 0).all()) if exact else True


def keep_count(length: int, density: float) -> int:
    """Entries kept out of ``length`` at ``density`` (rounded half up, so 50% of 5 keeps 3)."""
    return int(length * density + 0.5)


def check_tail(size: int, group: int, tail: str) -> None:
    """Raise a clear error when ``size`` is not a multiple of ``group`` under ``tail='error'``."""
    if tail not in TAIL_POLICIES:
        raise PatternError(f"tail must be one of {TAIL_POLICIES}, got {tail!r}")
    if tail == "error" and size % group:
        raise PatternError(
            f"dimension of size {size} is not divisible by the group size M={group}; choose the tail policy "
            f"'pad' (partial last group keeps at most N) or 'dense' (leave the tail dense): --tail pad|dense "
            f"on the command line, tail='pad'|'dense' in Python"
        )


def group_counts(mask: torch.Tensor, group: int, dim: int = -1, tail: TailPolicy = "error") -> torch.Tensor | None:
    """Kept (non-zero) entries per full group along ``dim``; shape (..., size // group).

    Returns None when ``tail='error'`` and the size is not a multiple of ``group``. The tail is
    checked separately by the caller's policy: under ``pad`` it counts as a partial group.
    """
    m = (mask.movedim(dim, -1) != 0)
    size = m.shape[-1]
    if tail == "error" and size % group:
        return None
    full = size - size % group
    counts = m[..., :full].reshape(*m.shape[:-1], full // group, group).sum(-1)
    if tail == "pad" and size % group:
        counts = torch.cat([counts, m[..., full:].sum(-1, keepdim=True)], dim=-1)
    return counts


def groups_keep_at_most(mask: torch.Tensor, group: int, keep: int, dim: int = -1, tail: TailPolicy = "error",
                        exact: bool = False) -> bool:
    """True when every group of ``group`` along ``dim`` has at most (``exact``: exactly) ``keep`` non-zeros."""
    counts = group_counts(mask, group, dim, tail)
    if counts is None:
        return False
    return bool((counts == keep).all()) if exact else bool((counts <= keep).all())


def summarize(tensor: torch.Tensor, pattern: Pattern | str, dim: int = -1, tail: TailPolicy = "error") -> dict:
    """Per-tensor summary: shape, sparsity (fraction of zeros), validity against ``pattern``."""
    pattern = parse(pattern)
    nonzero = tensor != 0
    summary = {
        "shape": list(tensor.shape),
        "pattern": str(pattern),
        "sparsity": round(1.0 - nonzero.float().mean().item(), 6),
        "valid": pattern.is_valid(nonzero, dim=dim, tail=tail),
    }
    if isinstance(pattern, NM):
        counts = group_counts(nonzero, pattern.group, dim, tail)
        summary["groups"] = 0 if counts is None else counts.numel()
        summary["violating_groups"] = None if counts is None else int((counts > pattern.keep).sum())
    return summary


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


ZooPattern = Transposable | VNM | HiNM | Balanced | TileWise
Pattern = NM | Unstructured | Dense | Transposable | VNM | HiNM | Balanced | TileWise
PATTERN_TYPES: tuple[type, ...] = (NM, Unstructured, Dense, Transposable, VNM, HiNM, Balanced, TileWise)

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_PCT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_T_RE = re.compile(r"^\s*(?:(?:transposable|t)\s+(\d+)\s*:\s*(\d+)|(\d+)\s*:\s*(\d+)\s*t)\s*$", re.I)
_VNM_RE = re.compile(r"^\s*v?(\d+)\s*:\s*(\d+)\s*:\s*(\d+)\s*$", re.I)
_BAL_RE = re.compile(r"^\s*balanced\s*:?\s*(\d+)\s*/\s*(\d+)\s*$", re.I)


def parse(spec: str | Pattern) -> Pattern:
    """Parse any pattern string: ``"2:4"`` (keep 2 of 4), ``"50%"`` (unstructured), ``"dense"``,
    ``"2:4T"`` / ``"transposable 2:4"``, ``"64:2:8"`` / ``"v64:2:8"`` (V:N:M, N kept) or
    ``"balanced:32/128"``. A pattern object is returned as is."""
    if isinstance(spec, PATTERN_TYPES):
        return spec
    if not isinstance(spec, str):
        raise PatternError(f"pattern must be a string like '2:4', got {type(spec).__name__}. {NM_HELP}")
    if spec.strip().lower() == "dense":
        return Dense()
    if m := _NM_RE.match(spec):
        n, mm = int(m.group(1)), int(m.group(2))
        if not (1 <= n < mm <= MAX_GROUP):
            raise PatternError(f"invalid pattern {spec!r}: {NM_HELP}")
        return NM(n, mm)
    if m := _PCT_RE.match(spec):
        return Unstructured(float(m.group(1)) / 100.0)
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
    raise PatternError(f"cannot parse pattern {spec!r}: {NM_HELP}")
