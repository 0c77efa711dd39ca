"""V:N:M (VENOM) masks: per V x M block keep 4 columns shared by the V rows, then N of those 4 per row.

``exhaustive`` scores every 4-column subset of each block (C(M, 4): 70 for M=8, 1820 for M=16) and
is exact for the kept-score objective; ``l1`` keeps the 4 columns with the largest column sums
(the "Beyond 2:4" heuristic, O(numel)). Both are batched over all blocks. :func:`vnm_permute`
searches an input-channel permutation that raises the V:N:M kept score.
"""

from __future__ import annotations

import functools
import itertools
import math
import time

import torch

from nmkit.patterns import VNM, PatternError, parse
from nmkit.solvers.nm import topk_mask
from nmkit.solvers.permutation import PermutationResult, kept_by_rows, topn_sum


def _as_vnm(pattern: VNM | str) -> VNM:
    p = parse(pattern) if isinstance(pattern, str) else pattern
    if not isinstance(p, VNM):
        raise PatternError(f"expected a V:N:M pattern such as '64:2:8', got {pattern!r}")
    return p


@functools.lru_cache(maxsize=8)
def _subsets(m: int, k: int) -> torch.Tensor:
    return torch.tensor(list(itertools.combinations(range(m), k)), dtype=torch.long)


def _blocks(scores: torch.Tensor, p: VNM) -> torch.Tensor:
    """(R, C) -> (R/V, C/M, V, M)."""
    r, c = scores.shape[-2:]
    if r % p.v or c % p.group:
        raise PatternError(f"V:N:M {p} needs rows divisible by V={p.v} and cols by M={p.group}, got {r}x{c}")
    return scores.reshape(-1, r // p.v, p.v, c // p.group, p.group).transpose(2, 3).reshape(-1, p.v, p.group)


def _choose_columns(blocks: torch.Tensor, p: VNM, method: str, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """Bool (B, M): the 4 kept columns of each block."""
    b, v, m = blocks.shape
    if method == "l1":
        return topk_mask(blocks.sum(1), p.columns)
    subs = _subsets(m, p.columns)  # (S, 4)
    best = torch.empty(b, dtype=torch.long)
    step = max(1, chunk_elems // (subs.numel() * v))
    for s in range(0, b, step):
        x = blocks[s : s + step]
        cand = x[:, :, subs]  # (b, V, S, 4)
        best[s : s + step] = topn_sum(cand, p.keep).sum(1).argmax(-1)  # first best subset on ties
    return torch.zeros(b, m, dtype=torch.bool).scatter_(1, subs[best], True)


def _auto_method(scores: torch.Tensor, p: VNM) -> str:
    """Exhaustive unless that means more than ~2e9 candidate evaluations."""
    work = scores.numel() * math.comb(p.group, p.columns) * p.columns / p.group
    return "exhaustive" if work <= 2e9 else "l1"


def vnm_mask(scores: torch.Tensor, pattern: VNM | str, method: str = "auto") -> torch.Tensor:
    """Boolean V:N:M mask for (..., R, C) scores (larger = more important).

    ``method``: ``"exhaustive"`` (exact; VENOM), ``"l1"`` (column-sum heuristic) or ``"auto"``
    (exhaustive unless that means more than ~2e9 candidate evaluations).
    """
    p = _as_vnm(pattern)
    if method == "auto":
        method = _auto_method(scores, p)
    if method not in ("exhaustive", "l1"):
        raise PatternError(f"unknown V:N:M method {method!r}; use auto, exhaustive or l1")
    x = scores.detach()
    x = x if x.is_floating_point() else x.float()
    blocks = _blocks(x, p).cpu() if x.device.type != "cpu" else _blocks(x, p)
    cols = _choose_columns(blocks, p, method)  # (B, M)
    masked = blocks.masked_fill(~cols.unsqueeze(1), float("-inf"))
    # top-N among the 4 kept columns per row; -inf columns never win while N < 4
    keep = topk_mask(masked, p.keep) & cols.unsqueeze(1)
    r, c = scores.shape[-2:]
    out = keep.reshape(-1, r // p.v, c // p.group, p.v, p.group).transpose(2, 3).reshape(scores.shape)
    return out.to(scores.device)


def vnm_kept(scores: torch.Tensor, pattern: VNM | str, method: str = "auto") -> float:
    """Total score a V:N:M mask keeps."""
    return float((scores.double() * vnm_mask(scores, pattern, method)).sum())


def _exhaustive_block_best(x: torch.Tensor, p: VNM) -> torch.Tensor:
    """(R, k) columns -> (R/V,): the best kept score of each V-row block over every 4-column subset."""
    r, k = x.shape
    cand = x.reshape(r // p.v, p.v, k)[:, :, _subsets(k, p.columns)]  # (blocks, V, S, 4)
    return topn_sum(cand, p.keep).sum(1).max(-1).values


def _reassign_round(
    xp: torch.Tensor, perm: torch.Tensor, p: VNM, gen: torch.Generator, block: int, deadline: float = math.inf
) -> int:
    """One column-reassignment round for the exhaustive V:N:M objective, in place; returns columns moved.

    One random column leaves every group (random blocks of at most ``block`` groups). Putting column x
    into the remaining M-1 columns ("core") keeps, per V-row block, the better of the core's own best
    4-subset and, over every 3-subset T of the core, sum_r topN(T) + max(0, x_r - t_r) (t: T's N-th
    largest); so the score of every (column, core) pairing is computed at once and the best
    reassignment of all taken-out columns is an exact linear assignment, which never loses score.
    A block not scored by ``deadline`` is left as it is.
    """
    from scipy.optimize import linear_sum_assignment

    r, c = xp.shape
    m, nb = p.group, r // p.v
    groups = c // m
    triples = _subsets(m - 1, p.columns - 1)  # (T, 3)
    pos = torch.randint(m, (groups,), generator=gen)
    moved = 0
    for chunk in torch.randperm(groups, generator=gen).split(block):
        k = len(chunk)
        if k < 2:
            continue
        out_cols = chunk * m + pos[chunk]
        slots = torch.arange(m).expand(k, m)
        core_cols = (chunk[:, None] * m + slots)[slots != pos[chunk][:, None]].reshape(k, m - 1)
        x = xp[:, out_cols].T.contiguous()  # (k, R)
        g = torch.empty(k, k, dtype=torch.float64)
        step = max(1, (1 << 24) // (r * len(triples)))  # taken-out columns per pass: bounds memory
        for j in range(k):
            if time.perf_counter() > deadline:
                return moved
            core = xp[:, core_cols[j]]  # (R, M-1)
            own = _exhaustive_block_best(core, p)  # (blocks,)
            trip = core[:, triples]  # (R, T, 3)
            t = trip.sort(-1, descending=True).values[..., p.keep - 1]  # (R, T)
            base = (topn_sum(trip, p.keep) - t).reshape(nb, p.v, -1).sum(1)  # (blocks, T)
            for a0 in range(0, k, step):
                xa = x[a0 : a0 + step, :, None]
                with_x = torch.maximum(xa, t[None]).reshape(len(xa), nb, p.v, -1).sum(2) + base  # (a, blocks, T)
                g[a0 : a0 + step, j] = torch.maximum(with_x.max(-1).values, own).double().sum(-1)
        _, col_of = linear_sum_assignment(g.numpy(), maximize=True)
        col_of = torch.from_numpy(col_of)
        if float(g[torch.arange(k), col_of].sum()) <= float(g.diagonal().sum()) * (1 + 1e-9):
            continue
        dest = out_cols[col_of]  # taken-out column a moves into the free slot of core col_of[a]
        xp[:, dest] = x.T
        perm[dest] = perm[out_cols].clone()
        moved += int((col_of != torch.arange(k)).sum())
    return moved


def vnm_permute(
    scores: torch.Tensor,
    pattern: VNM | str,
    time_budget_s: float = 1.0,
    seed: int = 0,
    method: str = "auto",
    block: int = 256,
) -> PermutationResult:
    """Input-channel permutation that raises the V:N:M kept score. Apply as ``W[:, perm]``.

    With the exhaustive mask (``method`` "exhaustive", or "auto" where it resolves to it) the search
    first runs column-reassignment rounds (one column out of every group, all put back by an exact
    linear assignment over at most ``block`` groups at a time) until three rounds in a row move nothing;
    then, and for the ``l1`` mask throughout, randomised swap rounds: the column groups are paired at
    random, every pair tries one random column swap, and all improving swaps are applied at once.
    Never ends below the identity; stops at ``time_budget_s``.
    """
    start = time.perf_counter()
    p = _as_vnm(pattern)
    r, c = scores.shape
    x = scores.detach().float().cpu()
    groups = c // p.group
    perm = torch.arange(c)
    kept_default = vnm_kept(x, p, method)
    resolved = method if method != "auto" else _auto_method(x, p)
    gen = torch.Generator().manual_seed(seed)
    xp = x.clone()
    rounds = stale = 0
    if resolved == "exhaustive" and p.keep < p.columns < p.group:
        while time.perf_counter() - start < time_budget_s and groups >= 2 and stale < 3:
            stale = 0 if _reassign_round(xp, perm, p, gen, block, start + time_budget_s) else stale + 1
            rounds += 1

    def group_scores(xp: torch.Tensor, gidx: torch.Tensor) -> torch.Tensor:
        """Kept score per selected column group (summed over row blocks): (len(gidx),)."""
        cols = (gidx.unsqueeze(-1) * p.group + torch.arange(p.group)).reshape(-1)
        sub = xp[:, cols]  # (R, G*M)
        mk = vnm_mask(sub, p, method)
        return (sub * mk).reshape(r, -1, p.group).sum((0, 2)).double()

    current = group_scores(xp, torch.arange(groups))
    while time.perf_counter() - start < time_budget_s and groups >= 2:
        pairs = torch.randperm(groups, generator=gen)[: groups // 2 * 2].reshape(-1, 2)
        ia = pairs[:, 0] * p.group + torch.randint(p.group, (pairs.shape[0],), generator=gen)
        ib = pairs[:, 1] * p.group + torch.randint(p.group, (pairs.shape[0],), generator=gen)
        trial = xp.clone()
        trial[:, torch.cat([ia, ib])] = xp[:, torch.cat([ib, ia])]
        new = group_scores(trial, pairs.reshape(-1)).reshape(-1, 2)
        gain = new.sum(-1) - current[pairs].sum(-1)
        ok = gain > 1e-9 * float(current.sum()) / groups
        if ok.any():
            a, b = ia[ok], ib[ok]
            xp[:, torch.cat([a, b])] = xp[:, torch.cat([b, a])]
            perm[torch.cat([a, b])] = perm[torch.cat([b, a])].clone()
            current[pairs[ok].reshape(-1)] = new[ok].reshape(-1)
    kept = vnm_kept(xp, p, method)
    if kept < kept_default:  # float rounding in the assignment scores only; keep the identity
        perm, kept = torch.arange(c), kept_default
    label = f"vnm_reassign({rounds})+swaps" if rounds else "vnm_swaps"
    return PermutationResult(perm, kept, kept_default, kept_by_rows(x, p.density), time.perf_counter() - start, label)
