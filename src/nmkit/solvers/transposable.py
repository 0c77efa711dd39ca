"""Transposable N:M masks: every M x M tile keeps N per row and N per column.

Per tile this is a bipartite b-matching (a transportation problem with unit capacities). Its
constraint matrix is totally unimodular, so the LP relaxation has integral optima; that gives the
exact reference. Methods, all batched over tiles:
* ``exact``: M <= 4 scores every valid tile pattern with one matmul and takes the argmax (90
  patterns for 2:4); larger M solves the LP with HiGHS (slow, for tests and references).
* ``optimal``: the compiled per-tile solver (``csrc/nmkit_solvers.c``): greedy, completion by
  augmenting paths, 2x2 swaps, then positive-cycle cancelling on the row graph until none is left,
  which is the exact optimum (to a float tolerance); without the library it falls back to ``exact``.
* ``greedy``: the 2-approximation (keep entries in descending order while row and column have room);
  compiled for float32 CPU input (bit-identical to the torch loop), torch otherwise.
* ``fast``: greedy then exactly N everywhere. Compiled: completion by augmenting paths and best 2x2
  swaps while they gain; torch fallback: a repair step that fills open rows/columns with the best swap.
* ``entropic``: entropy-regularised optimal transport solved by Dykstra's method (Sinkhorn steps for
  the row and column sums, a corrected projection for the 0/1 box), then greedy rounding of the
  fractional plan, a repair step that fills unsaturated rows/columns and 2-swap local search.
* ``auto``: with the compiled library, ``optimal`` up to ``optimal_max_elems`` weights and ``fast``
  above (8192 x 8192 8:16 in ~1.6 s on one core); without it, ``exact`` for M <= 4, ``entropic`` up to
  ``entropic_max_elems`` weights, else the torch ``fast``.
"""

from __future__ import annotations

import functools
import itertools
from typing import Literal

import torch

from nmkit.patterns import NM, PatternError, Transposable, parse
from nmkit.solvers import native as _nat

Method = Literal["auto", "exact", "optimal", "greedy", "entropic", "fast"]
METHODS: tuple[str, ...] = ("auto", "exact", "optimal", "greedy", "entropic", "fast")
_ENUM_MAX_GROUP = 4
_CHUNK = 1 << 18  # tiles per batch for the pattern matmul


def _as_pattern(pattern: Transposable | NM | str) -> Transposable:
    if isinstance(pattern, Transposable):
        return pattern
    if isinstance(pattern, str):
        pattern = parse(pattern)
    if isinstance(pattern, NM):
        return Transposable(pattern.keep, pattern.group)
    raise PatternError(f"transposable masks need an N:M pattern, got {pattern!r}")


def to_tiles(x: torch.Tensor, m: int) -> torch.Tensor:
    """(..., R, C) -> (T, M, M) tiles, row-major over tiles."""
    *lead, r, c = x.shape
    if r % m or c % m:
        raise PatternError(f"transposable {m}x{m} tiles need both dims divisible by M={m}, got shape {tuple(x.shape)}")
    return x.reshape(-1, r // m, m, c // m, m).transpose(2, 3).reshape(-1, m, m)


def from_tiles(t: torch.Tensor, shape: torch.Size | tuple[int, ...], m: int) -> torch.Tensor:
    """Inverse of :func:`to_tiles`."""
    *lead, r, c = shape
    return t.reshape(-1, r // m, c // m, m, m).transpose(2, 3).reshape(shape)


@functools.lru_cache(maxsize=16)
def tile_patterns(n: int, m: int) -> torch.Tensor:
    """All M x M 0/1 matrices with N ones in every row and column, as (P, M*M) float (90 for 2:4)."""
    if m > _ENUM_MAX_GROUP:
        raise PatternError(f"enumerating transposable tile patterns is only practical for M <= 4, got M={m}")
    rows = [sum(1 << j for j in comb) for comb in itertools.combinations(range(m), n)]
    out = []
    for choice in itertools.product(rows, repeat=m):
        if all(sum((r >> j) & 1 for r in choice) == n for j in range(m)):
            out.append([(r >> j) & 1 for r in choice for j in range(m)])
    return torch.tensor(out, dtype=torch.float32)


def _exact_enumerate(tiles: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Best tile pattern by one matmul per chunk; ties go to the first pattern (deterministic)."""
    pats = tile_patterns(n, m).to(device=tiles.device)
    flat = tiles.reshape(tiles.shape[0], m * m)
    work = flat.double() if flat.dtype == torch.float64 else flat.float()
    best = torch.empty(flat.shape[0], dtype=torch.long, device=tiles.device)
    for s in range(0, flat.shape[0], _CHUNK):
        best[s : s + _CHUNK] = (work[s : s + _CHUNK] @ pats.to(work.dtype).T).argmax(-1)
    return pats[best].bool().reshape(-1, m, m)


def _exact_lp(tiles: torch.Tensor, n: int, m: int, chunk: int = 256) -> torch.Tensor:
    """Exact optimum via the LP relaxation (integral: the constraint matrix is totally unimodular)."""
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    data = tiles.detach().double().cpu().numpy()
    out = np.zeros(data.shape, dtype=bool)
    for s in range(0, data.shape[0], chunk):
        blk = data[s : s + chunk]
        k = blk.shape[0]
        nv = k * m * m
        var = np.arange(nv).reshape(k, m, m)
        row_con = (np.arange(k)[:, None, None] * m + np.arange(m)[None, :, None]).repeat(m, 2)
        col_con = k * m + (np.arange(k)[:, None, None] * m + np.arange(m)[None, None, :]).repeat(m, 1)
        rr = np.concatenate([row_con.ravel(), col_con.ravel()])
        cc = np.concatenate([var.ravel(), var.ravel()])
        a = coo_matrix((np.ones(rr.size), (rr, cc)), shape=(2 * k * m, nv)).tocsr()
        res = linprog(-blk.ravel(), A_eq=a, b_eq=np.full(2 * k * m, float(n)), bounds=(0, 1), method="highs")
        if res.status != 0:
            raise RuntimeError(f"LP solver failed: {res.message}")
        out[s : s + chunk] = (res.x > 0.5).reshape(k, m, m)
    return torch.from_numpy(out).to(tiles.device)


def _greedy_from_order(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Greedy pass over each tile's entries in descending ``values`` (ties: lower flat index first).

    One vectorised step per position in the sorted order (M^2 steps), each a flat gather/compare/
    scatter_add over all tiles into preallocated buffers (uint8 counters); no per-tile Python work.
    """
    t = values.shape[0]
    dev = values.device
    order = torch.sort(values.reshape(t, m * m), dim=-1, descending=True, stable=True).indices
    o32 = order.to(torch.int32)
    base = torch.arange(t, device=dev, dtype=torch.int32).mul_(m).unsqueeze(1)
    ridx = (o32 // m).add_(base).T.contiguous().long()  # (M^2, T) flat row-counter index per step
    cidx = (o32 % m).add_(base).T.contiguous().long()
    del o32
    rc = torch.zeros(t * m, dtype=torch.uint8, device=dev)
    cc = torch.zeros_like(rc)
    keep = torch.zeros(m * m, t, dtype=torch.bool, device=dev)
    g1, g2 = torch.empty(t, dtype=torch.uint8, device=dev), torch.empty(t, dtype=torch.uint8, device=dev)
    b1, b2 = torch.empty(t, dtype=torch.bool, device=dev), torch.empty(t, dtype=torch.bool, device=dev)
    for k in range(m * m):
        torch.gather(rc, 0, ridx[k], out=g1)
        torch.gather(cc, 0, cidx[k], out=g2)
        torch.lt(g1, n, out=b1)
        torch.lt(g2, n, out=b2)
        torch.logical_and(b1, b2, out=keep[k])
        src = keep[k].view(torch.uint8)
        rc.scatter_add_(0, ridx[k], src)
        cc.scatter_add_(0, cidx[k], src)
        if k % m == m - 1 and k >= n * m and bool((rc == n).all()):
            break
    return torch.zeros(t, m * m, dtype=torch.bool, device=dev).scatter_(1, order, keep.T).reshape(t, m, m)


def _repair(mask: torch.Tensor, tiles: torch.Tensor, n: int, steps: int) -> torch.Tensor:
    """Fill unsaturated rows/columns: for an open row i and open column j, add (i, j) directly when
    free, else swap a kept (i', j') for (i, j') and (i', j) (net +1 kept), choosing the best swap.

    Works on the tiles that need it (gathered once, shrunk as they finish); each step fixes one unit
    of deficit per tile.
    """
    t, m, _ = mask.shape
    need = ((mask.sum(-1) < n).any(-1) & (mask.sum(-2) < n).any(-1)).nonzero().squeeze(1)
    if need.numel() == 0:
        return mask
    mk, sc = mask[need], tiles[need]
    ar = torch.arange(need.numel(), device=mask.device)
    for _ in range(steps):
        row_open = mk.sum(-1) < n
        col_open = mk.sum(-2) < n
        todo = row_open.any(-1) & col_open.any(-1)
        n_todo = int(todo.sum())
        if n_todo == 0:
            break
        if n_todo * 2 < need.numel():  # shrink the working set to the tiles still open
            mask[need] = mk
            need, mk, sc = need[todo], mk[todo], sc[todo]
            row_open, col_open, todo = row_open[todo], col_open[todo], todo[todo]
            ar = torch.arange(need.numel(), device=mask.device)
        i = row_open.to(torch.uint8).argmax(-1)
        j = col_open.to(torch.uint8).argmax(-1)
        direct = todo & ~mk[ar, i, j]
        row_i = sc[ar, i]  # (K, M) scores of row i, indexed by j'
        col_j = sc[ar, :, j]  # (K, M) scores of column j, indexed by i'
        gain = row_i.unsqueeze(1) + col_j.unsqueeze(2) - sc  # [i', j']
        allowed = mk & ~mk[ar, i].unsqueeze(1) & ~mk[ar, :, j].unsqueeze(2)
        gain = gain.masked_fill_(~allowed, float("-inf")).reshape(-1, m * m)
        best = gain.argmax(-1)
        feasible = torch.isfinite(gain[ar, best])
        sw = todo & ~direct & feasible
        if not bool((direct | sw).any()):
            break
        ip, jp = best // m, best % m
        mk[ar[direct], i[direct], j[direct]] = True
        a = ar[sw]
        mk[a, ip[sw], jp[sw]] = False
        mk[a, i[sw], jp[sw]] = True
        mk[a, ip[sw], j[sw]] = True
    mask[need] = mk
    return mask


def _two_swap(mask: torch.Tensor, tiles: torch.Tensor, rounds: int) -> torch.Tensor:
    """2-opt: swap kept (i,j),(i',j') for (i,j'),(i',j) while that raises the kept score.

    For a row pair (i, i') the gain splits into s[i',j] - s[i,j] (j kept in i only) plus
    s[i,j'] - s[i',j'] (j' kept in i' only), so the best swap costs O(M^3) per tile, not O(M^4).
    One best swap per tile per round; row and column counts are unchanged.
    """
    t, m, _ = mask.shape
    chunk = max(1, (1 << 22) // m**3)
    active = torch.arange(t, device=mask.device)
    for _ in range(rounds):
        still = []
        for s in range(0, active.numel(), chunk):
            idx = active[s : s + chunk]
            mk, sc = mask[idx], tiles[idx]
            k = idx.numel()
            d = sc.unsqueeze(1) - sc.unsqueeze(2)  # d[i, i', j] = s[i', j] - s[i, j]
            only_i = mk.unsqueeze(2) & ~mk.unsqueeze(1)  # [i, i', j]: kept in row i, not in row i'
            a, ja = d.masked_fill(~only_i, float("-inf")).max(-1)
            b, jb = (-d).masked_fill(~only_i.transpose(1, 2), float("-inf")).max(-1)
            gain = (a + b).reshape(k, -1)
            best_gain, best = gain.max(-1)
            tol = 1e-6 * sc.reshape(k, -1).abs().amax(-1).clamp_min(1e-30)
            hit = (best_gain > tol).nonzero().squeeze(1)
            if hit.numel() == 0:
                continue
            i, ip = best[hit] // m, best[hit] % m
            j, jp = ja.reshape(k, -1)[hit, best[hit]], jb.reshape(k, -1)[hit, best[hit]]
            mk[hit, i, j] = False
            mk[hit, ip, j] = True
            mk[hit, ip, jp] = False
            mk[hit, i, jp] = True
            mask[idx] = mk
            still.append(idx[hit])
        if not still:
            break
        active = torch.cat(still)
    return mask


def _dykstra(tiles: torch.Tensor, n: int, tau: float, iters: int) -> torch.Tensor:
    """Entropic plan for max <S, B> + H(S)/tau s.t. rows/cols sum to N and 0 <= S <= 1.

    Bregman (KL) projections: row and column rescaling are exact projections on the affine sets;
    the box needs Dykstra's correction Q (new Q = S_before_clip * Q_old / S_after_clip), else the
    iteration converges to the wrong point. Scores are min-max normalised per tile (a shift adds
    the same constant to every feasible plan) so exp() cannot overflow.
    """
    x = tiles.float()
    lo = x.amin((-2, -1), keepdim=True)
    hi = x.amax((-2, -1), keepdim=True)
    b = (x - lo) / (hi - lo).clamp_min(1e-30)
    s = torch.exp(tau * (b - 1.0))
    q = torch.ones_like(s)
    tiny = 1e-30
    for _ in range(iters):
        s.mul_(n / s.sum(-1, keepdim=True).clamp_min(tiny))
        s.mul_(n / s.sum(-2, keepdim=True).clamp_min(tiny))
        s.mul_(q)
        clipped = s.clamp(max=1.0)
        q = s.div_(clipped.clamp_min(tiny))  # reuses s's storage for the new correction
        s = clipped
    return s


def _native_ok(scores: torch.Tensor, m: int) -> bool:
    return scores.device.type == "cpu" and m <= _nat.MAX_GROUP and _nat.available()


def transposable_mask(
    scores: torch.Tensor,
    pattern: Transposable | NM | str,
    method: Method = "auto",
    *,
    tau: float = 60.0,
    iters: int = 300,
    swap_rounds: int = 32,
    entropic_max_elems: int = 1 << 21,
    optimal_max_elems: int = 1 << 24,
    native: bool | None = None,
) -> torch.Tensor:
    """Boolean mask on the last two dims of ``scores`` that is N:M along rows and along columns.

    ``scores`` (..., R, C) with R and C multiples of M; larger is more important (use |W| or any
    importance score). Every method returns a valid mask; all but ``greedy`` keep exactly N per row
    and column of every tile, ``greedy`` may keep fewer (still hardware-valid). ``native``: use the
    compiled solvers (None: when loaded and the scores are on the CPU; False: torch paths only).
    """
    pat = _as_pattern(pattern)
    scores = scores.detach()
    n, m = pat.keep, pat.group
    if method not in METHODS:
        raise PatternError(f"unknown transposable method {method!r}; choose from {METHODS}")
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise PatternError("scores contain NaN; check the weights or activations that produced them")
    if scores.dim() < 2 or scores.shape[-1] % m or scores.shape[-2] % m:
        raise PatternError(
            f"transposable {m}x{m} tiles need both dims divisible by M={m}, got shape {tuple(scores.shape)}"
        )
    use_native = _native_ok(scores, m) if native is None else bool(native) and _native_ok(scores, m)
    if method == "auto":
        if use_native:
            method = "optimal" if scores.numel() <= optimal_max_elems else "fast"
        elif m <= _ENUM_MAX_GROUP:
            method = "exact"
        elif scores.numel() <= entropic_max_elems:
            method = "entropic"
        else:
            method = "fast"
    if use_native and (method in ("optimal", "fast") or (method == "greedy" and scores.dtype == torch.float32)):
        return _nat.transposable(scores, n, m, {"optimal": "optimal", "fast": "swap", "greedy": "greedy"}[method])
    if method == "optimal":
        method = "exact"  # no compiled library: the LP (or pattern enumeration) gives the same optimum
    tiles = to_tiles(scores, m)
    work = tiles if tiles.is_floating_point() else tiles.float()
    if method == "exact":
        out = _exact_enumerate(work, n, m) if m <= _ENUM_MAX_GROUP else _exact_lp(work, n, m)
    elif method == "greedy":
        out = _greedy_from_order(work, n, m)
    elif method == "fast":
        out = _greedy_from_order(work, n, m)
        out = _repair(out, work, n, steps=n * m)
    else:
        plan = _dykstra(work, n, tau, iters)
        out = _greedy_from_order(plan, n, m)
        out = _repair(out, work, n, steps=n * m)
        out = _two_swap(out, work.float(), swap_rounds)
    return from_tiles(out, scores.shape, m)


def tile_score(scores: torch.Tensor, mask: torch.Tensor) -> float:
    """Total score kept by ``mask`` (float64 sum), the objective every method maximises."""
    return float((scores.double() * mask).sum())
