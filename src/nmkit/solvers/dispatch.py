"""One entry point from a pattern to its solver: :func:`mask_for`, dispatched on the pattern's type.

Patterns (:mod:`nmkit.patterns`) only say what a valid mask looks like; each solver module finds
the mask that keeps the most score for its pattern kind. Adding a pattern kind means adding one row
to ``_SOLVERS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nmkit.patterns import (
    NM,
    VNM,
    Balanced,
    Dense,
    HiNM,
    Pattern,
    PatternError,
    TailPolicy,
    TileWise,
    Transposable,
    Unstructured,
    keep_count,
    parse,
)
from nmkit.solvers.balanced import balanced_mask, tile_wise_mask
from nmkit.solvers.hinm import hinm_mask
from nmkit.solvers.nm import nm_mask, topk_mask
from nmkit.solvers.transposable import transposable_mask
from nmkit.solvers.vnm import vnm_mask

Solver = Callable[[torch.Tensor, Pattern, int, TailPolicy], torch.Tensor]


def _tail_only_error(pattern: Pattern, tail: TailPolicy) -> None:
    if tail != "error":
        name = type(pattern).__name__
        raise PatternError(f"{name} supports only tail='error' (shapes must be multiples of the block size)")


def _unstructured(scores: torch.Tensor, pattern: Unstructured, dim: int, tail: TailPolicy) -> torch.Tensor:
    s = scores.movedim(dim, -1)
    return topk_mask(s, keep_count(s.shape[-1], pattern.density)).movedim(-1, dim)


def _dense(scores: torch.Tensor, pattern: Dense, dim: int, tail: TailPolicy) -> torch.Tensor:
    return torch.ones_like(scores, dtype=torch.bool)


def _last_dim(solve: Callable[[torch.Tensor, Pattern], torch.Tensor], error_tail_only: bool) -> Solver:
    """A (..., rows, cols) solver that groups along the last dim, moved to work along ``dim``."""

    def run(scores: torch.Tensor, pattern: Pattern, dim: int, tail: TailPolicy) -> torch.Tensor:
        if error_tail_only:
            _tail_only_error(pattern, tail)
        return solve(scores.movedim(dim, -1), pattern).movedim(-1, dim)

    return run


# Keyed by exact type: Transposable is an NM subclass but needs its own solver.
_SOLVERS: dict[type, Solver] = {
    NM: lambda s, p, dim, tail: nm_mask(s, p, dim=dim, tail=tail),
    Unstructured: _unstructured,
    Dense: _dense,
    Transposable: _last_dim(transposable_mask, error_tail_only=True),
    VNM: _last_dim(vnm_mask, error_tail_only=True),
    HiNM: _last_dim(hinm_mask, error_tail_only=True),
    Balanced: lambda s, p, dim, tail: balanced_mask(s, p, dim=dim, tail=tail),
    TileWise: _last_dim(tile_wise_mask, error_tail_only=False),
}


def mask_for(scores: torch.Tensor, pattern: Pattern | str, dim: int = -1, tail: TailPolicy = "error") -> torch.Tensor:
    """Boolean mask in ``pattern`` keeping the most of ``scores`` (groups along ``dim``; ties: lower index).

    A public edge (``nmkit.mask_for``): a pattern string is parsed here; nmkit's own callers pass
    parsed patterns.
    """
    if isinstance(pattern, str):
        pattern = parse(pattern)
    solver = _SOLVERS.get(type(pattern))
    if solver is None:
        raise PatternError(f"no solver for pattern {pattern!r}; parse strings with nmkit.parse first")
    return solver(scores, pattern, dim, tail)
