"""TASD: approximate a (sparse or dense) tensor by a sum of structured N:M tensors.

``A ~ S_1 + S_2 + ...`` where each ``S_k`` is N_k:M_k along the last dim, so ``A @ B`` can run as a sum
of structured-sparse products on hardware that only supports a few patterns. Greedy series: each
term keeps the top-N_k of every M_k group of the current residual. Terms have disjoint supports, so
terms with the same M add up exactly to one N:M term with the summed N (2:4 + 1:4 == 3:4); the series
pays off when that sum is not a pattern the hardware runs, or when mixing group sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from nmkit.patterns import NM
from nmkit.solvers.nm import nm_mask


@dataclass
class TASDResult:
    """Structured terms, what is left over, and the relative error after each number of terms."""

    terms: list[torch.Tensor]
    patterns: list[NM]
    residual: torch.Tensor
    rel_errors: list[float] = field(default_factory=list)  # ||A - sum_{<=k} S||_F / ||A||_F, k = 1..K

    @property
    def density(self) -> float:
        """Compute density of the series (sum of N/M): the work relative to a dense product."""
        return sum(p.density for p in self.patterns)

    def reconstruct(self) -> torch.Tensor:
        return torch.stack(self.terms).sum(0) if self.terms else torch.zeros_like(self.residual)


def tasd_decompose(tensor: torch.Tensor, terms: Sequence[str | NM] = ("2:4", "1:4")) -> TASDResult:
    """Greedy TASD of ``tensor`` (groups along the last dim; shape must be a multiple of every M).

    Each term is the magnitude top-N of every M-group of the residual left by the earlier terms.
    """
    pats = [NM.parse(t) for t in terms]
    a = tensor.detach()
    norm = float(a.double().norm()) or 1.0
    residual = a.clone()
    out, errs = [], []
    for p in pats:
        mask = nm_mask(residual.abs(), p) & (residual != 0)
        term = residual * mask
        residual = residual - term
        out.append(term)
        errs.append(float(residual.double().norm()) / norm)
    return TASDResult(out, pats, residual, errs)
