"""Hierarchical N:M (HiNM): column-vector pruning per tile of V rows, then row-wise N:M on the kept vectors.

Both steps are batched over tiles. :func:`hinm_permute` searches the output-channel permutation
(which rows share a tile: the part of gyro-permutation that decides vector pruning): first
gyro-style sampled balanced clustering (a quarter of each tile's rows is taken out; each tile's kept
columns from its remaining rows act as its centroid; the sampled rows are scored against every tile
by the N:M score they would keep there and re-dealt over the freed seats by a Hungarian assignment;
kept when the HiNM kept score rises), then randomised, vectorised row swaps between tiles for the
rest of the budget, accepted when the HiNM kept score rises. The per-tile order of
the kept columns is free for the kernel (it only reorders the vector index), so the inner N:M can
additionally use :func:`nmkit.solvers.permutation.permute_channels` on each compacted tile.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from nmkit.patterns import HiNM, PatternError
from nmkit.solvers.nm import topk_mask
from nmkit.solvers.permutation import PermutationResult, kept_by_rows, topn_sum


def hinm_mask(scores: torch.Tensor, pattern: HiNM, return_vectors: bool = False):
    """Boolean HiNM mask for (R, C) scores; with ``return_vectors`` also the kept column ids (T, K).

    Per tile of V rows keep the ``pattern.kept_vectors(C)`` columns with the largest summed score
    (ties: lower index), in ascending order; then in each row keep the top N of every M consecutive
    kept columns.
    """
    if not isinstance(pattern, HiNM):
        raise PatternError(f"expected a HiNM pattern, got {pattern!r}")
    r, c = scores.shape[-2:]
    v, n, m = pattern.v, pattern.inner.keep, pattern.inner.group
    if r % v or c % m:
        raise PatternError(f"HiNM needs rows divisible by V={v} and cols by M={m}, got {r}x{c}")
    k = pattern.kept_vectors(c)
    x = scores.detach()
    x = x if x.is_floating_point() else x.float()
    tiles = x.reshape(-1, v, c)  # (T, V, C)
    vec = topk_mask(tiles.sum(1), k)  # (T, C)
    # stable sort: the kept columns come first and stay in ascending (original) order
    idx = torch.sort(vec.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :k]
    comp = torch.gather(tiles, 2, idx.unsqueeze(1).expand(-1, v, -1))  # (T, V, K)
    inner = topk_mask(comp.reshape(-1, v, k // m, m), n).reshape(-1, v, k)
    out = torch.zeros_like(tiles, dtype=torch.bool).scatter_(2, idx.unsqueeze(1).expand(-1, v, -1), inner)
    out = out.reshape(scores.shape)
    return (out, idx) if return_vectors else out


def hinm_kept(scores: torch.Tensor, pattern: HiNM) -> float:
    return float((scores.double() * hinm_mask(scores, pattern)).sum())


def _tile_kept(x: torch.Tensor, pattern: HiNM) -> torch.Tensor:
    """Kept score per tile (T,)."""
    mk = hinm_mask(x, pattern)
    return (x * mk).reshape(-1, pattern.v * x.shape[-1]).sum(-1).double()


def _gyro_rows(x: torch.Tensor, perm: torch.Tensor, pattern: HiNM, deadline: float, gen: torch.Generator) -> str:
    """Gyro-style balanced re-clustering of rows into tiles, in place; keeps the best layout seen.

    Each step samples a quarter of every tile's rows, takes each tile's kept columns from its *other*
    rows (the centroid; without the sampled rows, so a row is not pulled back by columns it chose
    itself), scores every sampled row against every tile by the N:M score it would keep there, and
    re-deals the sampled rows over the freed seats with a Hungarian assignment. A step is kept when
    the HiNM kept score rises. Returns a short description.
    """
    from scipy.optimize import linear_sum_assignment

    r, c = x.shape
    v, t, k = pattern.v, r // pattern.v, pattern.kept_vectors(c)
    n, m = pattern.inner.keep, pattern.inner.group
    s = max(1, v // 4)
    best = hinm_kept(x, pattern)
    steps = kept_steps = 0
    while time.perf_counter() < deadline:
        steps += 1
        local = torch.argsort(torch.rand(t, v, generator=gen), dim=1)[:, :s]  # (T, s) sampled slots
        rows = (torch.arange(t).unsqueeze(1) * v + local).reshape(-1)  # (T*s,)
        tiles = x.reshape(t, v, c)
        rest = tiles.sum(1) - x[rows].reshape(t, s, c).sum(1)  # column sums without the sampled rows
        vec = topk_mask(rest, k)
        idx = torch.sort(vec.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :k]  # (T, K)
        profit = topn_sum(x[rows][:, idx].reshape(-1, t, k // m, m), n).sum(-1)  # (T*s, T)
        _, seat = linear_sum_assignment(-profit.double().repeat_interleave(s, dim=1).numpy())
        new_rows = rows[torch.from_numpy(np.argsort(seat, kind="stable"))]  # row for each freed seat
        trial_x, trial_p = x.clone(), perm.clone()
        trial_x[rows], trial_p[rows] = x[new_rows], perm[new_rows]
        kept = hinm_kept(trial_x, pattern)
        if kept > best * (1 + 1e-9):
            best, kept_steps = kept, kept_steps + 1
            x.copy_(trial_x)
            perm.copy_(trial_p)
    return f"gyro({kept_steps}/{steps})"


def hinm_permute(
    scores: torch.Tensor, pattern: HiNM, time_budget_s: float = 1.0, seed: int = 0, method: str = "auto"
) -> PermutationResult:
    """Output-channel (row) permutation for HiNM: apply as ``W[perm]`` (and permute the consumer's
    inputs to match, see :mod:`nmkit.permute_model`).

    ``method``: ``"gyro"`` (balanced clustering with Hungarian assignment, see the module doc),
    ``"swaps"`` (each round pairs tiles at random and tries one random row swap per pair; improving
    swaps are applied together, pairs being disjoint) or ``"auto"`` (gyro for 70% of the budget, then
    swaps). ``kept_rows`` in the result is the row-wise unstructured bound at the
    same density.
    """
    if method not in ("auto", "gyro", "swaps"):
        raise PatternError(f"unknown HiNM permutation method {method!r}; use auto, gyro or swaps")
    if method != "swaps":
        import scipy.optimize  # noqa: F401  (a slow first import: keep it out of the time budget)
    start = time.perf_counter()
    x = scores.detach().float().cpu().clone()
    r, c = x.shape
    v = pattern.v
    t = r // v
    perm = torch.arange(r)
    kept_default = hinm_kept(x, pattern)
    label = "hinm_row_swaps"
    gen = torch.Generator().manual_seed(seed)
    if method in ("auto", "gyro") and t >= 2:
        share = 1.0 if method == "gyro" else 0.7  # auto: the rest of the budget polishes with row swaps
        label = _gyro_rows(x, perm, pattern, start + share * time_budget_s, gen)
        if method == "auto":
            label += "+row_swaps"
    current = _tile_kept(x, pattern)
    while method != "gyro" and time.perf_counter() - start < time_budget_s and t >= 2:
        pairs = torch.randperm(t, generator=gen)[: t // 2 * 2].reshape(-1, 2)
        ra = pairs[:, 0] * v + torch.randint(v, (pairs.shape[0],), generator=gen)
        rb = pairs[:, 1] * v + torch.randint(v, (pairs.shape[0],), generator=gen)
        rows = (pairs.reshape(-1, 1) * v + torch.arange(v)).reshape(-1)
        trial = x[rows].clone().reshape(-1, 2, v, c)
        la, lb = ra % v, rb % v
        ar = torch.arange(pairs.shape[0])
        tmp = trial[ar, 0, la].clone()
        trial[ar, 0, la] = trial[ar, 1, lb]
        trial[ar, 1, lb] = tmp
        new = _tile_kept(trial.reshape(-1, c), pattern).reshape(-1, 2)
        gain = new.sum(-1) - current[pairs].sum(-1)
        ok = gain > 1e-9 * float(current.sum()) / t
        if ok.any():
            a, b = ra[ok], rb[ok]
            x[torch.cat([a, b])] = x[torch.cat([b, a])]
            perm[torch.cat([a, b])] = perm[torch.cat([b, a])].clone()
            current[pairs[ok].reshape(-1)] = new[ok].reshape(-1)
    kept = hinm_kept(x, pattern)
    return PermutationResult(
        perm,
        kept,
        kept_default,
        kept_by_rows(scores.float(), pattern.density),
        time.perf_counter() - start,
        label,
    )
