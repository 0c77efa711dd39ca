"""Balanced (bank) and tile-wise (TW / tile-vector-wise TVW) masks.

Balanced sparsity is N:M with a large group: every bank of a row keeps the same count, so every
bank (thread) does the same work. Tile-wise sparsity keeps a smaller *dense* GEMM per tile: whole
output rows are pruned first, the surviving rows form tiles of ``tile`` rows, and each tile keeps
whole column segments. The overall budget is met exactly with a top-k over segment scores.
"""

from __future__ import annotations

import math

import torch

from nmkit.patterns import Balanced, PatternError, TailPolicy, TileWise, check_tail
from nmkit.solvers.nm import topk_mask


def balanced_mask(scores: torch.Tensor, pattern: Balanced, dim: int = -1, tail: TailPolicy = "error") -> torch.Tensor:
    """Keep the top ``pattern.keep`` of every bank of ``pattern.bank`` entries along ``dim``."""
    s = scores.movedim(dim, -1)
    size = s.shape[-1]
    check_tail(size, pattern.bank, tail)
    full = size - size % pattern.bank
    lead = s.shape[:-1]
    mask = topk_mask(s[..., :full].reshape(*lead, full // pattern.bank, pattern.bank), pattern.keep)
    mask = mask.reshape(*lead, full)
    if full < size:
        rest = s[..., full:]
        rest_mask = torch.ones_like(rest, dtype=torch.bool) if tail == "dense" else topk_mask(rest, pattern.keep)
        mask = torch.cat([mask, rest_mask], dim=-1)
    return mask.movedim(-1, dim)


def tile_wise_mask(scores: torch.Tensor, pattern: TileWise) -> torch.Tensor:
    """Tile-wise mask for a (R, C) score matrix (rows = output channels, cols = reduction dim).

    Step 1 keeps the ``sqrt(density)`` fraction of rows with the largest L2 norm (as in the TW
    reference, the two steps share the sparsity). Step 2 scores each (tile, column) segment by its
    mean squared score and keeps the best segments until the budget of weights is used. With
    ``pattern.inner`` (TVW), kept segments per tile are rounded to a multiple of M and each row keeps
    N of every M kept columns; the budget then counts the tile's dense work times N/M.
    """
    if scores.dim() != 2:
        raise PatternError(f"tile_wise_mask needs a 2-D score matrix, got {tuple(scores.shape)}")
    x = scores.detach().float()
    r, c = x.shape
    budget = pattern.budget(x.numel())
    ratio = 1.0 if pattern.inner is None else pattern.inner.density
    work_budget = budget / ratio  # dense tile work allowed
    rows_keep = min(r, max(1, math.ceil(r * math.sqrt(pattern.density))))
    row_idx = torch.sort(topk_mask(x.pow(2).sum(-1), rows_keep).nonzero().squeeze(1)).values
    kept_rows = x[row_idx]  # (r', C)
    rr = kept_rows.shape[0]
    pad = (-rr) % pattern.tile
    tiles = torch.cat([kept_rows, kept_rows.new_zeros(pad, c)]).reshape(-1, pattern.tile, c)
    sizes = torch.full((tiles.shape[0],), pattern.tile)
    sizes[-1] = pattern.tile - pad
    seg = tiles.pow(2).sum(1) / sizes.unsqueeze(1)  # (T, C) mean squared score per segment
    flat = seg.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    seg_size = sizes.repeat_interleave(c)[order]
    chosen = order[torch.cumsum(seg_size, 0) <= work_budget]
    keep_seg = torch.zeros(flat.shape[0], dtype=torch.bool)
    keep_seg[chosen] = True
    keep_seg = keep_seg.reshape(-1, c)  # (T, C)
    if pattern.inner is not None:
        n, m = pattern.inner.keep, pattern.inner.group
        counts = keep_seg.sum(-1)
        target = counts // m * m  # drop the weakest segments down to a multiple of M
        ranked = torch.sort(seg.masked_fill(~keep_seg, float("-inf")), dim=-1, descending=True, stable=True)
        rank = torch.empty_like(ranked.indices).scatter_(
            1, ranked.indices, torch.arange(c).expand(keep_seg.shape[0], -1).contiguous()
        )
        keep_seg = keep_seg & (rank < target.unsqueeze(1))
    mask_tiles = keep_seg.unsqueeze(1).expand(-1, pattern.tile, -1).clone()
    if pattern.inner is not None:
        k = int(keep_seg.sum(-1).max()) if keep_seg.numel() else 0
        if k:
            # stable sort: kept columns first, in ascending order, then the rest (padding)
            idx = torch.sort(keep_seg.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :k]
            valid = torch.gather(keep_seg, 1, idx)  # tiles with fewer kept columns have padding
            comp = torch.gather(tiles, 2, idx.unsqueeze(1).expand(-1, pattern.tile, -1))
            comp = comp.masked_fill(~valid.unsqueeze(1), float("-inf"))
            inner = topk_mask(comp.reshape(tiles.shape[0], pattern.tile, k // m, m), n).reshape(comp.shape)
            inner &= valid.unsqueeze(1)
            mask_tiles = torch.zeros_like(mask_tiles).scatter_(2, idx.unsqueeze(1).expand(-1, pattern.tile, -1), inner)
    mask_rows = mask_tiles.reshape(-1, c)[:rr]
    out = torch.zeros(r, c, dtype=torch.bool, device=scores.device)
    out[row_idx] = mask_rows.to(scores.device)
    return out
