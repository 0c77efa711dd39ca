"""Transposable N:M masks: N:M along rows *and* columns of every M x M block, so W and W.T are both N:M.

nmkit's shared transposable solver (``nmkit.solvers.transposable``) was not in the tree when this
was written; this module holds only what training needs: exact search over all block patterns when
there are few (M = 4: 90 patterns for 2:4) and a greedy per-block fill otherwise (may keep fewer
than N in a row or column, never more).
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

from nmkit.errors import UserError
from nmkit.patterns import NM

_MAX_EXACT_PATTERNS = 5000


@lru_cache(maxsize=16)
def block_patterns(n: int, m: int) -> torch.Tensor | None:
    """All M x M 0/1 blocks with N ones per row and per column, flattened (K, M*M); None if too many."""
    rows = [r for r in itertools.product((0, 1), repeat=m) if sum(r) == n]
    if len(rows) ** m > 10**7:  # enumeration itself too large (M >= 8)
        return None
    found = []
    for combo in itertools.product(rows, repeat=m):
        if all(sum(col) == n for col in zip(*combo, strict=True)):
            found.append([v for r in combo for v in r])
            if len(found) > _MAX_EXACT_PATTERNS:
                return None
    return torch.tensor(found, dtype=torch.float32)


def _blocks(scores: torch.Tensor, m: int) -> torch.Tensor:
    out_dim, in_dim = scores.shape
    return scores.reshape(out_dim // m, m, in_dim // m, m).permute(0, 2, 1, 3).reshape(-1, m * m)


def _unblock(blocks: torch.Tensor, shape: torch.Size, m: int) -> torch.Tensor:
    out_dim, in_dim = shape
    return blocks.reshape(out_dim // m, in_dim // m, m, m).permute(0, 2, 1, 3).reshape(out_dim, in_dim)


def transposable_mask(weight: torch.Tensor, pattern: NM) -> torch.Tensor:
    """Boolean mask, N:M along dim -1 and along dim 0, maximising kept ``|weight|`` per M x M block."""
    n, m = pattern.keep, pattern.group
    if weight.dim() != 2 or weight.shape[0] % m or weight.shape[1] % m:
        raise UserError(
            f"transposable {pattern} masks need a 2-D weight with both sizes divisible by M={m}, "
            f"got shape {tuple(weight.shape)}"
        )
    blocks = _blocks(weight.detach().abs().float(), m)
    candidates = block_patterns(n, m)
    if candidates is not None:
        # argmax returns the first maximum: ties go to the lowest pattern index, deterministically.
        best = (blocks @ candidates.T).argmax(dim=1)
        chosen = candidates[best].bool()
    else:
        chosen = _greedy(blocks, n, m)
    return _unblock(chosen, weight.shape, m)


def _greedy(blocks: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Visit entries by decreasing |w| (stable), accept while its row and column keep fewer than N."""
    order = torch.sort(blocks, dim=1, descending=True, stable=True).indices
    nb = blocks.shape[0]
    rows = torch.zeros(nb, m, dtype=torch.long)
    cols = torch.zeros(nb, m, dtype=torch.long)
    chosen = torch.zeros_like(blocks, dtype=torch.bool)
    ar = torch.arange(nb)
    for k in range(m * m):
        idx = order[:, k]
        r, c = idx // m, idx % m
        ok = (rows[ar, r] < n) & (cols[ar, c] < n)
        chosen[ar, idx] = ok
        rows[ar, r] += ok.long()
        cols[ar, c] += ok.long()
    return chosen
