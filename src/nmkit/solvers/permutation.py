"""Input-channel permutations that raise the score N:M keeps (Pool & Yu style, vectorised).

Permuting the columns of ``W`` (input channels) before row-wise N:M changes which weights share a
group; the permutation is undone for free by permuting the producing layer's outputs
(:mod:`nmkit.permute_model`). The objective is the total score kept by N:M after the permutation.

Search ("stripe groups"): a stripe is one group of M columns. For a set of k stripes, every way to
redistribute their k*M columns into k stripes is scored at once (35 ways for two 2:4 stripes,
5,775 for three), batched over many stripe sets with torch; the best non-overlapping improvements
are applied and the search repeats. Small matrices evaluate all stripe pairs, then all triples, then
spend the rest of the time budget on perturb-and-reoptimise escapes. Larger matrices (compiled in
``csrc/nmkit_solvers.c`` for M <= 32) alternate annealed column-reassignment rounds (one column out of
every stripe, all put back at once by an exact linear assignment) with, for M <= 4, rounds of random
stripe pairs (all pairs disjoint, every pair re-split optimally); without the compiled library they pair stripes at
random on a row sample.

Quality metric ``efficacy``: the share of the gap between plain N:M and row-wise unstructured
pruning at the same density that the permutation closes (100% = as good as unstructured per row).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass

import torch

from nmkit.patterns import NM, PatternError
from nmkit.solvers import native

_TRIPLES_MAX_STRIPES = 16  # auto: all stripe triples up to here (560 triples), then column reassignment
_PAIRS_MAX_STRIPES = 32  # ... or, without the compiled library, all pairs up to here (496 pairs), then random pairs
_TEMP = 2e-4
_NOISE = 0.2  # column reassignment: initial noise amplitude / (sqrt(rows) x mean score)
_ANNEAL_FRAC = 0.8  # ... decaying to zero over this share of the budget (or of max_escapes rounds)
_ASSIGN_ROUNDS = 5  # reassignment rounds between two random stripe-pair rounds
_ASSIGN_BLOCK = 1024  # at most this many stripes per assignment (random blocks above)
_ASSIGN_MAX_M = 32  # the compiled column reassignment takes groups of up to this many columns
_PAIRS_MAX_M = 4  # ... and its stripe-pair rounds (every split of 2M columns) up to this many


@dataclass
class PermutationResult:
    """A column permutation and how much it helps: apply as ``W[:, perm]``."""

    perm: torch.Tensor
    kept: float  # score kept by N:M after permuting
    kept_default: float  # score kept by N:M with the identity permutation
    kept_rows: float  # score kept by row-wise unstructured pruning at the same density (upper bound)
    seconds: float
    method: str

    @property
    def efficacy(self) -> float:
        """Gap closed between plain N:M (0) and row-wise unstructured (1)."""
        gap = self.kept_rows - self.kept_default
        return 1.0 if gap <= 0 else (self.kept - self.kept_default) / gap


def topn_sum(x: torch.Tensor, n: int, dim: int = -1) -> torch.Tensor:
    """Sum of the ``n`` largest values along ``dim`` (branch-free fast path for 2 of 4)."""
    if x.shape[dim] == 4 and n == 2:
        a, b, c, d = x.unbind(dim)
        m1, n1 = torch.maximum(a, b), torch.minimum(a, b)
        m2, n2 = torch.maximum(c, d), torch.minimum(c, d)
        return torch.maximum(m1, m2).add_(torch.maximum(torch.minimum(m1, m2), torch.maximum(n1, n2)))
    if n == 1:
        return x.amax(dim)
    return x.topk(n, dim=dim, sorted=False).values.sum(dim)


def kept_by_nm(scores: torch.Tensor, pattern: NM | str) -> float:
    """Total score N:M keeps along the last dim (float64 sum)."""
    p = NM.parse(pattern)
    s = scores.detach().double()
    return float(topn_sum(s.reshape(*s.shape[:-1], -1, p.group), p.keep).sum())


def kept_by_rows(scores: torch.Tensor, density: float) -> float:
    """Total score row-wise unstructured pruning keeps at ``density`` (the permutation upper bound)."""
    k = int(scores.shape[-1] * density + 0.5)
    return float(scores.detach().double().topk(k, dim=-1).values.sum())


@functools.lru_cache(maxsize=8)
def _partitions(k: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsets of size m of range(k*m) (S, m) and the unique partitions into k of them (P, k).

    Order inside a stripe and the order of stripes do not matter, so each partition is listed once
    (the stripe holding the smallest remaining column comes first). Partition 0 is the identity.
    """
    w = k * m
    subsets = list(itertools.combinations(range(w), m))
    index = {s: i for i, s in enumerate(subsets)}
    parts: list[list[int]] = []

    def rec(remaining: tuple[int, ...], acc: list[int]) -> None:
        if not remaining:
            parts.append(list(acc))
            return
        first, rest = remaining[0], remaining[1:]
        for comb in itertools.combinations(rest, m - 1):
            s = (first, *comb)
            rec(tuple(c for c in rest if c not in comb), acc + [index[s]])

    rec(tuple(range(w)), [])
    return torch.tensor(subsets, dtype=torch.long), torch.tensor(parts, dtype=torch.long)


def _group_gains(
    xt: torch.Tensor,
    groups: torch.Tensor,
    n: int,
    m: int,
    k: int,
    chunk_elems: int = 1 << 20,
    deadline: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For stripe groups (G, k) of the current layout, the best redistribution and its gain.

    ``xt`` is the permuted score matrix transposed (C, R). Returns (gain (G,), best partition (G,)).
    Small chunks keep the gathered block in cache (4x faster than one big gather). Groups not
    reached by ``deadline`` get gain 0 (no move).
    """
    subsets, parts = _partitions(k, m)
    r = xt.shape[1]
    g = groups.shape[0]
    cols = (groups.unsqueeze(-1) * m + torch.arange(m)).reshape(g, k * m)  # (G, w) column ids
    step = max(1, chunk_elems // (subsets.numel() * r))
    gains, bests = [], []
    for s in range(0, g, step):
        if time.perf_counter() > deadline:
            gains.append(torch.zeros(g - s))
            bests.append(torch.zeros(g - s, dtype=torch.long))
            break
        c = cols[s : s + step]
        sub = xt[c[:, subsets]]  # (g, S, m, R)
        ss = topn_sum(sub, n, dim=-2).sum(-1)  # (g, S)
        tot = ss[:, parts].sum(-1)  # (g, P)
        best_val, best = tot.max(-1)
        gains.append(best_val - tot[:, 0])
        bests.append(best)
    return torch.cat(gains), torch.cat(bests)


def _swap_gains(
    xt: torch.Tensor, pairs: torch.Tensor, n: int, m: int, chunk_elems: int = 1 << 22
) -> tuple[torch.Tensor, torch.Tensor]:
    """For stripe pairs (G, 2): best single column swap between the two stripes and its gain.

    Used for large M, where redistributing 2M columns exhaustively (C(2M, M) subsets) is too
    costly. Returns (gain (G,), flat swap index i*M + j: column i of the first, j of the second).
    """
    r = xt.shape[1]
    g = pairs.shape[0]
    ar = torch.arange(m)
    step = max(1, chunk_elems // (m * m * m * r))
    gains, bests = [], []
    for s in range(0, g, step):
        p = pairs[s : s + step]
        a = xt[(p[:, 0:1] * m + ar)]  # (g, M, R)
        b = xt[(p[:, 1:2] * m + ar)]
        base = topn_sum(a, n, dim=1).sum(-1) + topn_sum(b, n, dim=1).sum(-1)  # (g,)
        # a with column i replaced by b's column j: (g, i, j, M, R)
        ea = a.unsqueeze(1).unsqueeze(1).expand(-1, m, m, -1, -1).clone()
        eb = b.unsqueeze(1).unsqueeze(1).expand(-1, m, m, -1, -1).clone()
        ii, jj = torch.meshgrid(ar, ar, indexing="ij")
        ea[:, ii, jj, ii] = b[:, jj]
        eb[:, ii, jj, jj] = a[:, ii]
        tot = topn_sum(ea, n, dim=3).sum(-1) + topn_sum(eb, n, dim=3).sum(-1)  # (g, M, M)
        best_val, best = tot.reshape(tot.shape[0], -1).max(-1)
        gains.append(best_val - base)
        bests.append(best)
    return torch.cat(gains), torch.cat(bests)


def _apply(perm: torch.Tensor, xt: torch.Tensor, groups: torch.Tensor, best: torch.Tensor, m: int, k: int) -> None:
    """Rewrite the chosen stripe groups in place with their best partitions."""
    subsets, parts = _partitions(k, m)
    cols = (groups.unsqueeze(-1) * m + torch.arange(m)).reshape(groups.shape[0], k * m)
    new_local = subsets[parts[best]].reshape(groups.shape[0], k * m)  # local column order
    src = torch.gather(cols, 1, new_local)
    perm[cols.reshape(-1)] = perm[src.reshape(-1)].clone()
    xt[cols.reshape(-1)] = xt[src.reshape(-1)].clone()


def _pick_disjoint(groups: torch.Tensor, gains: torch.Tensor, tol: float) -> torch.Tensor:
    """Indices of improving groups, best first, that share no stripe with a better one."""
    order = torch.argsort(gains, descending=True, stable=True)
    used: set[int] = set()
    chosen = []
    for i in order.tolist():
        if gains[i] <= tol:
            break
        st = groups[i].tolist()
        if used.isdisjoint(st):
            used.update(st)
            chosen.append(i)
    return torch.tensor(chosen, dtype=torch.long)


class _StripeSearch:
    """Exhaustive k-stripe moves over all stripe k-subsets, with cached gains (small matrices)."""

    def __init__(
        self, xt: torch.Tensor, perm: torch.Tensor, n: int, m: int, k: int, tol: float, deadline: float
    ) -> None:
        self.xt, self.perm, self.n, self.m, self.k, self.tol = xt, perm, n, m, k, tol
        self.stripes = xt.shape[0] // m
        self.groups = torch.tensor(list(itertools.combinations(range(self.stripes), k)), dtype=torch.long)
        self.gains, self.best = _group_gains(xt, self.groups, n, m, k, deadline=deadline)

    def refresh(self, changed_stripes: torch.Tensor) -> None:
        """Re-score the groups that touch any changed stripe."""
        changed = torch.zeros(self.stripes, dtype=torch.bool)
        changed[changed_stripes] = True
        stale = changed[self.groups].any(-1).nonzero().squeeze(1)
        if stale.numel():
            self.gains[stale], self.best[stale] = _group_gains(self.xt, self.groups[stale], self.n, self.m, self.k)

    def converge(self, deadline: float) -> bool:
        """Apply best disjoint improvements until none is left; False if the deadline cut it short."""
        while time.perf_counter() < deadline:
            chosen = _pick_disjoint(self.groups, self.gains, self.tol)
            if chosen.numel() == 0:
                return True
            _apply(self.perm, self.xt, self.groups[chosen], self.best[chosen], self.m, self.k)
            self.refresh(self.groups[chosen].reshape(-1))
        return False

    def swap_columns(self, a: int, b: int) -> None:
        self.perm[[a, b]] = self.perm[[b, a]]
        self.xt[[a, b]] = self.xt[[b, a]]
        self.refresh(torch.tensor([a // self.m, b // self.m]))

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        return self.perm.clone(), self.xt.clone(), self.gains.clone(), self.best.clone()

    def restore(self, snap: tuple[torch.Tensor, ...]) -> None:
        for dst, src in zip((self.perm, self.xt, self.gains, self.best), snap, strict=True):
            dst.copy_(src)


def _random_column_pair(stripes: int, m: int, gen: torch.Generator) -> tuple[int, int]:
    """Two random columns in two different stripes: the perturbation of the escape rounds."""
    s1, s2 = torch.randperm(stripes, generator=gen)[:2].tolist()
    return s1 * m + int(torch.randint(m, (1,), generator=gen)), s2 * m + int(torch.randint(m, (1,), generator=gen))


def _swap_rows(xt: torch.Tensor, perm: torch.Tensor, a: int, b: int) -> None:
    xt[[a, b]] = xt[[b, a]]
    perm[[a, b]] = perm[[b, a]]


def _random_pairs(
    xt: torch.Tensor,
    perm: torch.Tensor,
    n: int,
    m: int,
    tol: float,
    deadline: float,
    gen: torch.Generator,
    sample_rows: int,
) -> None:
    """Rounds of random disjoint stripe pairs, each pair re-arranged optimally (M <= 4) or by its best
    column swap (M > 4); moves are proposed on a row sample and verified on all rows."""
    c, r = xt.shape
    stripes = c // m
    ar = torch.arange(m)
    stale = 0
    while time.perf_counter() < deadline and stale < 3:
        pairs = torch.randperm(stripes, generator=gen)[: stripes // 2 * 2].reshape(-1, 2)
        xs = xt if r <= sample_rows else xt[:, torch.randperm(r, generator=gen)[:sample_rows]]
        cols = (pairs.unsqueeze(-1) * m + ar).reshape(-1, 2 * m)  # (G, 2M) current column ids
        if m <= 4:
            gains, best = _group_gains(xs, pairs, n, m, 2, deadline=deadline)
            subsets, parts = _partitions(2, m)
            local = subsets[parts[best]].reshape(-1, 2 * m)
        else:
            gains, best = _swap_gains(xs, pairs, n, m)
            local = torch.arange(2 * m).repeat(pairs.shape[0], 1)
            i, j = best // m, m + best % m
            rows_ = torch.arange(pairs.shape[0])
            local[rows_, i], local[rows_, j] = j, i
        cand = (gains > 0).nonzero().squeeze(1)
        if cand.numel() == 0:
            stale += 1
            continue
        old = cols[cand]
        new = torch.gather(old, 1, local[cand])
        before = topn_sum(xt[old].reshape(-1, 2, m, r), n, dim=2).sum((1, 2))
        after = topn_sum(xt[new].reshape(-1, 2, m, r), n, dim=2).sum((1, 2))
        ok = (after - before) > tol
        stale = 0 if bool(ok.any()) else stale + 1
        if bool(ok.any()):
            dst, src = old[ok].reshape(-1), new[ok].reshape(-1)
            perm[dst] = perm[src].clone()
            xt[dst] = xt[src].clone()


def _native_ok() -> bool:
    return native.available()


def _native_random_pairs(
    xt: torch.Tensor, perm: torch.Tensor, p: NM, deadline: float, seed: int, max_anneal: int | None
) -> int:
    """Compiled search for large matrices: annealed column-reassignment rounds, each followed by one round
    of random stripe pairs (M <= 4), then the same moves without noise until they stop gaining (or the deadline).

    A reassignment round takes one random column out of every stripe and puts them all back by an exact
    linear assignment (``native.stripe_assign``): long exchange cycles over all stripes at once, which
    pair moves cannot make. Uniform noise on the assignment scores, decaying linearly to zero, lets
    early rounds accept small losses. The noise decays over ``_ANNEAL_FRAC`` of the time budget, or, with
    ``max_anneal`` set, of that many rounds (then the result does not depend on timing; 0: no annealing,
    plain convergence). Returns the number of rounds; never ends below the starting layout."""

    n, m = p.keep, p.group
    pairs = m <= _PAIRS_MAX_M  # above, splitting 2M columns every way costs too much: reassignment alone
    start = time.perf_counter()
    span = max(deadline - start, 1e-9)
    start_kept, start_state = kept_by_nm(xt.T, p), (xt.clone(), perm.clone())
    noise0 = _NOISE * math.sqrt(xt.shape[1]) * float(xt.mean())
    rounds = 0

    def left() -> float:
        return max(deadline - time.perf_counter(), 0.0)

    def sub_seed() -> int:
        return (seed * 1_000_003 + rounds) & (2**63 - 1)

    while left() > 0 and (max_anneal is None or rounds < max_anneal):
        frac = rounds / max_anneal if max_anneal is not None else 1.0 - left() / span
        noise = noise0 * (1.0 - frac / _ANNEAL_FRAC)
        if noise <= 0:
            break
        native.stripe_assign(
            xt, perm, n, m, left(), seed=sub_seed(), noise=noise, block=_ASSIGN_BLOCK, max_rounds=_ASSIGN_ROUNDS
        )
        if pairs:
            native.stripe_pairs(xt, perm, n, m, left(), seed=sub_seed(), max_stale=1)
        rounds += 1
    while left() > 0:  # greedy: until neither move finds a gain in 3 rounds in a row
        moved = native.stripe_assign(xt, perm, n, m, left(), seed=sub_seed(), block=_ASSIGN_BLOCK, max_stale=3)
        pair_rounds = native.stripe_pairs(xt, perm, n, m, left(), seed=sub_seed(), max_stale=3) if pairs else 0
        rounds += 1
        if moved == 0 and pair_rounds <= 3:
            break
    if kept_by_nm(xt.T, p) < start_kept:  # only possible if the deadline cut the annealing short
        xt.copy_(start_state[0])
        perm.copy_(start_state[1])
    return rounds


def _native_stripe_search(
    xt: torch.Tensor,
    perm: torch.Tensor,
    p: NM,
    method: str,
    deadline: float,
    gen: torch.Generator,
    max_escapes: int | None,
) -> int:
    """The pairs -> triples -> pairs convergence of the torch search, compiled, then the same escapes
    (random column swaps between stripes, pair re-convergence, annealed acceptance, keep the best)."""

    n, m, stripes = p.keep, p.group, xt.shape[0] // p.group

    def left() -> float:
        return max(deadline - time.perf_counter(), 0.0)

    native.stripe_converge(xt, perm, n, m, 2, left())
    if method == "triples" and stripes >= 3:
        native.stripe_converge(xt, perm, n, m, 3, left())
        native.stripe_converge(xt, perm, n, m, 2, left())
    best_kept = cur_kept = kept_by_nm(xt.T, p)
    best = cur = (xt.clone(), perm.clone())
    budget_left = max(left(), 1e-9)
    temp0 = _TEMP * cur_kept / stripes
    tol = 1e-7 * cur_kept / stripes
    tries = 0
    while left() > 0 and (max_escapes is None or tries < max_escapes):
        tries += 1
        temp = temp0 * left() / budget_left
        for _ in range(1 + tries % 2):
            _swap_rows(xt, perm, *_random_column_pair(stripes, m, gen))
        native.stripe_converge(xt, perm, n, m, 2, left())
        kept = kept_by_nm(xt.T, p)
        if kept > best_kept + tol:
            best_kept, best = kept, (xt.clone(), perm.clone())
        if kept > cur_kept - temp * float(torch.rand((), generator=gen)):
            cur_kept, cur = kept, (xt.clone(), perm.clone())
        else:
            xt.copy_(cur[0])
            perm.copy_(cur[1])
    xt.copy_(best[0])
    perm.copy_(best[1])
    return tries


def permute_channels(
    scores: torch.Tensor,
    pattern: NM | str = "2:4",
    method: str = "auto",
    time_budget_s: float = 1.0,
    seed: int = 0,
    max_escapes: int | None = None,
    sample_rows: int = 256,
) -> PermutationResult:
    """Find a column permutation ``perm`` so that N:M on ``scores[:, perm]`` keeps more score.

    ``scores`` (rows, cols) non-negative importance (e.g. ``|W|`` or Wanda scores), groups along
    the last dim. ``method``: ``"auto"`` (exhaustive stripe triples plus escapes up to 16 stripes,
    ``random_pairs`` above), ``"pairs"``, ``"triples"`` or ``"random_pairs"`` (for M > 4 a
    stripe-pair move is the best single column swap, as redistributing 2M columns exhaustively is too
    costly).
    Stops at ``time_budget_s`` or after ``max_escapes`` perturb-and-repolish rounds (None: until
    the budget); the result is always at least as good as the identity. With the compiled solvers
    (M <= 32) ``random_pairs`` alternates annealed column-reassignment rounds (a random column out of
    every stripe, all put back by an exact linear assignment over all rows) with (M <= 4) rounds of
    random stripe pairs split optimally, then converges without noise; the annealing spans the time budget, or with
    ``max_escapes`` set, that many rounds (0: no annealing), so the result does not depend on timing
    unless the deadline cuts the search. Without them it
    proposes pair moves on a fresh random sample of ``sample_rows`` rows each round and applies only
    those whose exact gain over all rows is positive. Seeded, so repeatable for a given budget (the
    number of rounds or escapes that fit in the budget varies with machine load).
    """
    start = time.perf_counter()
    p = NM.parse(pattern)
    n, m = p.keep, p.group
    if scores.dim() != 2:
        raise PatternError(f"permute_channels needs a 2-D (rows, cols) score matrix, got {tuple(scores.shape)}")
    r, c = scores.shape
    if c % m:
        raise PatternError(f"permute_channels: {c} columns is not a multiple of M={m}")
    if method not in ("auto", "pairs", "triples", "random_pairs"):  # before any early return
        raise PatternError(f"unknown permutation method {method!r}; use auto, pairs, triples or random_pairs")
    stripes = c // m
    x = scores.detach().float().cpu()
    kept_default = kept_by_nm(x, p)
    kept_rows = kept_by_rows(x, p.density)
    perm = torch.arange(c)
    if stripes < 2 or kept_rows - kept_default <= 1e-9 * max(1.0, abs(kept_rows)):
        return PermutationResult(perm, kept_default, kept_default, kept_rows, time.perf_counter() - start, "none")
    if method == "auto":
        if m <= 4 and stripes <= _TRIPLES_MAX_STRIPES:
            method = "triples"
        elif m <= 4 and stripes <= _PAIRS_MAX_STRIPES and not _native_ok():
            method = "pairs"
        else:
            method = "random_pairs"
    if method in ("pairs", "triples") and m > 4:
        method = "random_pairs"  # exhaustive redistribution of 2M columns is C(2M, M): too many
    deadline = start + time_budget_s
    tol = 1e-7 * kept_default / stripes
    xt = x.T.contiguous()
    gen = torch.Generator().manual_seed(seed)

    if method == "random_pairs":
        if m <= _ASSIGN_MAX_M and _native_ok():
            rounds = _native_random_pairs(xt, perm, p, deadline, seed, max_escapes)
            kept = kept_by_nm(xt.T, p)
            took = time.perf_counter() - start
            return PermutationResult(perm, kept, kept_default, kept_rows, took, f"random_pairs[C]+assign({rounds})")
        _random_pairs(xt, perm, n, m, tol, deadline, gen, sample_rows)
        kept = kept_by_nm(xt.T, p)
        return PermutationResult(perm, kept, kept_default, kept_rows, time.perf_counter() - start, method)

    if m <= 4 and _native_ok():
        tries = _native_stripe_search(xt, perm, p, method, deadline, gen, max_escapes)
        kept = kept_by_nm(xt.T, p)
        took = time.perf_counter() - start
        return PermutationResult(perm, kept, kept_default, kept_rows, took, f"{method}[C]+escapes({tries})")

    search = _StripeSearch(xt, perm, n, m, 2, tol, deadline)
    search.converge(deadline)
    if method == "triples" and stripes >= 3 and time.perf_counter() < deadline:
        triples = _StripeSearch(xt, perm, n, m, 3, tol, deadline)
        triples.converge(deadline)
        search.refresh(torch.arange(stripes))
        search.converge(deadline)
    # escapes (iterated local search): perturb the best layout with random column swaps between
    # stripes, re-converge the cheap pair moves (only touched groups are re-scored), keep if better
    best_kept = cur_kept = kept_by_nm(xt.T, p)
    best_snap = cur_snap = search.snapshot()
    budget_left = max(deadline - time.perf_counter(), 1e-9)
    temp0 = _TEMP * cur_kept / stripes  # accept small regressions early on (annealed to zero)
    tries = 0
    while (now := time.perf_counter()) < deadline and (max_escapes is None or tries < max_escapes):
        tries += 1
        temp = temp0 * max(0.0, (deadline - now) / budget_left)
        for _ in range(1 + tries % 2):
            search.swap_columns(*_random_column_pair(stripes, m, gen))
        search.converge(deadline)
        kept = kept_by_nm(xt.T, p)
        if kept > best_kept + tol:
            best_kept, best_snap = kept, search.snapshot()
        if kept > cur_kept - temp * float(torch.rand((), generator=gen)):
            cur_kept, cur_snap = kept, search.snapshot()
        else:
            search.restore(cur_snap)
    search.restore(best_snap)
    kept = kept_by_nm(xt.T, p)
    return PermutationResult(
        perm.clone(), kept, kept_default, kept_rows, time.perf_counter() - start, f"{method}+escapes({tries})"
    )
