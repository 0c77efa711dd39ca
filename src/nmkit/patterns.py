"""Sparsity patterns: what a mask must look like, independent of how it was found.

Convention used everywhere in nmkit: **"N:M" means keep N of every M consecutive weights**
(``"2:4"`` keeps 2 of 4, 50% sparse; ``"2:8"`` keeps 2 of 8, 75% sparse). Groups run along the
reduction dimension (``dim=-1`` for ``nn.Linear.weight`` of shape (out, in)).

Each pattern validates a mask (:meth:`is_valid`) and projects scores onto itself (:meth:`project`).
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
        if not isinstance(pattern, NM):
            raise PatternError(f"expected an N:M pattern, got {spec!r}. {NM_HELP}")
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

    def project(self, scores: torch.Tensor, dim: int = -1, tail: TailPolicy = "error") -> torch.Tensor:
        """Boolean mask keeping the top ``keep`` scores of each group (ties: lower index wins)."""
        from nmkit.solvers.nm import nm_mask

        return nm_mask(scores, self, dim=dim, tail=tail)


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

    def project(self, scores: torch.Tensor, dim: int = -1, tail: TailPolicy = "error") -> torch.Tensor:
        from nmkit.solvers.nm import topk_mask

        s = scores.movedim(dim, -1)
        return topk_mask(s, keep_count(s.shape[-1], self.density)).movedim(-1, dim)


@dataclass(frozen=True)
class Dense:
    """No sparsity: every weight is kept."""

    density: float = 1.0
    sparsity: float = 0.0

    def __str__(self) -> str:
        return "dense"

    def is_valid(self, mask: torch.Tensor, dim: int = -1, tail: TailPolicy = "error", exact: bool = False) -> bool:
        return bool((mask != 0).all()) if exact else True

    def project(self, scores: torch.Tensor, dim: int = -1, tail: TailPolicy = "error") -> torch.Tensor:
        return torch.ones_like(scores, dtype=torch.bool)


Pattern = NM | Unstructured | Dense

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_PCT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse(spec: str | Pattern) -> Pattern:
    """Parse a pattern string: ``"2:4"`` (keep 2 of 4), ``"50%"`` (unstructured) or ``"dense"``."""
    if isinstance(spec, (NM, Unstructured, Dense)):
        return spec
    if not isinstance(spec, str) and hasattr(spec, "is_valid") and hasattr(spec, "project"):
        return spec  # a pattern from nmkit.pattern_zoo (transposable, V:N:M, ...)
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
    from nmkit.pattern_zoo import parse_zoo  # lazy: the zoo imports this module

    if (zoo := parse_zoo(spec)) is not None:
        return zoo
    raise PatternError(f"cannot parse pattern {spec!r}: {NM_HELP}")


def keep_count(length: int, density: float) -> int:
    """Entries kept out of ``length`` at ``density`` (rounded half up, so 50% of 5 keeps 3)."""
    return int(length * density + 0.5)


def check_tail(size: int, group: int, tail: str) -> None:
    """Raise a clear error when ``size`` is not a multiple of ``group`` under ``tail='error'``."""
    if tail not in TAIL_POLICIES:
        raise PatternError(f"tail must be one of {TAIL_POLICIES}, got {tail!r}")
    if tail == "error" and size % group:
        raise PatternError(
            f"dimension of size {size} is not divisible by the group size M={group}; "
            f"pass tail='pad' (partial last group keeps at most N) or tail='dense' (leave the tail dense)"
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
