"""TASD: approximate a (sparse or dense) tensor by a sum of structured N:M tensors.

``A ~ S_1 + S_2 + ...`` where each ``S_k`` is N_k:M_k along the last dim, so ``A @ B`` can run as a sum
of structured-sparse products on hardware that only supports a few patterns. Greedy series: each
term keeps the top-N_k of every M_k group of the current residual.

Group offsets. If every term's groups start at column 0, the terms' supports nest inside one
coarser N:M pattern (2:4 + 1:4 is a 3:4 support, 1:4 + 2:8 a 4:8 support), so such a series can
never beat that single term. Staggering the groups breaks the nesting: term k's groups start at
column ``offset_k`` (``offsets="auto"``: ``k * min(M) // K``, e.g. 2:4 + 1:4 at offsets 0 and 2), so
a value left over by a crowded group of one term lands in a group of the other term that straddles
two of the first term's groups. A term with offset o is an ordinary N:M product on the input padded
by ``(M - o) % M`` leading zero columns (:meth:`TASDResult.padded_term`), so the engine runs it as is.
Put the terms with the smaller M first (measured: 2:4 + 2:8 beats 2:8 + 2:4 by 3x in error).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from nmkit.patterns import NM, PatternError
from nmkit.solvers.nm import nm_mask


def _pads(size: int, m: int, offset: int) -> tuple[int, int]:
    """Leading and trailing zero columns that put groups starting at ``offset`` on multiples of M."""
    left = (m - offset) % m
    return left, (-(size + left)) % m


@dataclass
class TASDResult:
    """Structured terms, what is left over, and the relative error after each number of terms."""

    terms: list[torch.Tensor]
    patterns: list[NM]
    residual: torch.Tensor
    rel_errors: list[float] = field(default_factory=list)  # ||A - sum_{<=k} S||_F / ||A||_F, k = 1..K
    offsets: list[int] = field(default_factory=list)  # column where term k's first full group starts

    @property
    def density(self) -> float:
        """Compute density of the series (sum of N/M): the work relative to a dense product."""
        return sum(p.density for p in self.patterns)

    def reconstruct(self) -> torch.Tensor:
        return torch.stack(self.terms).sum(0) if self.terms else torch.zeros_like(self.residual)

    def padded_term(self, k: int) -> torch.Tensor:
        """Term k with the zero columns that align its groups to multiples of M (a plain N:M tensor;
        multiply it with the input padded the same way)."""
        p, off = self.patterns[k], self.offsets[k] if self.offsets else 0
        left, right = _pads(self.terms[k].shape[-1], p.group, off)
        return F.pad(self.terms[k], (left, right))


def _fit(residual: torch.Tensor, p: NM, offset: int) -> torch.Tensor:
    left, right = _pads(residual.shape[-1], p.group, offset)
    padded = F.pad(residual.abs(), (left, right))
    mask = nm_mask(padded, p)[..., left : left + residual.shape[-1]] & (residual != 0)
    return residual * mask


def tasd_decompose(
    tensor: torch.Tensor,
    terms: Sequence[str | NM] = ("2:4", "1:4"),
    offsets: Literal["auto"] | int | Sequence[int] = "auto",
) -> TASDResult:
    """Greedy TASD of ``tensor`` (groups along the last dim).

    Each term is the magnitude top-N of every M-group of the residual left by the earlier terms.
    ``offsets``: where each term's groups start ("auto" staggers them, see the module doc; 0 aligns
    every term, the classic series whose same-M terms add up to one N:M term). Partial groups at the
    edges keep at most N, as if zero-padded.
    """
    pats = [NM.parse(t) for t in terms]
    if offsets == "auto":
        step = min((p.group for p in pats), default=1)
        offs = [(k * step) // max(len(pats), 1) for k in range(len(pats))]
    elif isinstance(offsets, int):
        offs = [offsets] * len(pats)
    else:
        offs = [int(o) for o in offsets]
    if len(offs) != len(pats):
        raise PatternError(f"{len(offs)} offsets for {len(pats)} terms")
    offs = [o % p.group for o, p in zip(offs, pats, strict=True)]
    a = tensor.detach()
    norm = float(a.double().norm()) or 1.0
    residual = a.clone()
    out, errs = [], []
    for p, off in zip(pats, offs, strict=True):
        term = _fit(residual, p, off)
        residual = residual - term
        out.append(term)
        errs.append(float(residual.double().norm()) / norm)
    return TASDResult(out, pats, residual, errs, offs)
