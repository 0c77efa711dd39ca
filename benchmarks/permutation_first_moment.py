"""A first-moment estimate of the best 2:4 permutation efficacy on an i.i.d. |N(0,1)| matrix.

Given each row's values, an i.i.d. matrix has its entries in every row in uniformly random order,
independently across rows. So for any fixed column partition P (= a permutation, up to the order of
groups and of columns inside a group) the kept score K(P) has one and the same distribution: a sum of
independent row terms, each the top-2-of-4 score of a random partition of that row's values. The
expected number of partitions whose kept score reaches K is then #partitions x P(K(identity) >= K),
and where that is far below 1, no partition reaches K (Markov's inequality on the count). With a
Gaussian tail for the row sum (a sum of `rows` independent terms) this gives the efficacy e* above
which the expected count drops below 1:

    e* = (sqrt(2 V ln #partitions) - (K(identity) - E)) / (K_rowwise - K(identity))

with E and V the mean (exact, from order statistics) and variance (estimated by sampling partitions of
a subset of rows) of K(P) over random row orders, K_rowwise the kept score of row-wise 50% unstructured pruning.

This is an estimate, not a proof (the tail is taken as Gaussian), so the script also prints e* on
small matrices where the exact optimum is known (benchmarks/permutation_ceiling.py solves them by
MIP): the estimate must lie above each of them.

    python benchmarks/permutation_first_moment.py --rows 4096 --cols 4096 --seeds 2 --search 55 --threads 2
    python benchmarks/permutation_first_moment.py --rows 4096 --cols 16 24 32 --seeds 0 1
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from nmkit.solvers.permutation import kept_by_nm, kept_by_rows, permute_channels


def log_partitions(cols: int, m: int = 4) -> float:
    """ln of the number of ways to split `cols` columns into unordered groups of `m` unordered columns."""
    g = cols // m
    return math.lgamma(cols + 1) - g * math.lgamma(m + 1) - math.lgamma(g + 1)


def random_order_mean(w: np.ndarray) -> float:
    """Exact mean of the 2:4 kept score over random orders of every row. Sorted descending, the
    i-th value of a row (i-1 larger values) is kept when at most one of its 3 group mates, a uniform
    3-subset of the other cols-1 values, is larger."""
    rows, cols = w.shape
    i = np.arange(cols)  # number of larger values
    smaller = cols - 1 - i
    p_kept = (_choose3(smaller) + i * smaller * (smaller - 1) / 2) / _choose3(np.full(cols, cols - 1))
    return float((-np.sort(-w, axis=1) @ p_kept).sum())


def _choose3(k: np.ndarray) -> np.ndarray:
    k = k.astype(np.float64)
    return k * (k - 1) * (k - 2) / 6


def random_order_variance(w: np.ndarray, samples: int, sample_rows: int, rng: np.random.Generator) -> float:
    """Variance of the 2:4 kept score of the whole matrix over random orders of every row, estimated
    from `samples` random partitions of `sample_rows` randomly chosen rows, scaled to all rows."""
    rows, cols = w.shape
    pick = rng.choice(rows, size=min(sample_rows, rows), replace=False)
    variances = []
    for r in pick:
        perms = np.argsort(rng.random((samples, cols)), axis=1)
        v = np.sort(w[r][perms].reshape(samples, cols // 4, 4), axis=2)
        variances.append((v[:, :, 2] + v[:, :, 3]).sum(1).var(ddof=1))
    return float(np.mean(variances)) * rows


def estimate(rows: int, cols: int, seed: int, samples: int, sample_rows: int, search_s: float) -> dict:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).abs()
    found = permute_channels(x, "2:4", time_budget_s=search_s) if search_s > 0 else None
    k_id, k_rows = kept_by_nm(x, "2:4"), kept_by_rows(x, 0.5)
    w = x.double().numpy()
    mean, var = random_order_mean(w), random_order_variance(w, samples, sample_rows, np.random.default_rng(seed))
    lp = log_partitions(cols)
    e_star = (math.sqrt(2 * var * lp) - (k_id - mean)) / (k_rows - k_id)
    # log of the expected number of partitions at 20% efficacy, same Gaussian tail
    t20 = 0.2 * (k_rows - k_id) + (k_id - mean)
    return {
        "e_star": e_star,
        "log_count_at_20": lp - t20 * t20 / (2 * var),
        "log_partitions": lp,
        "identity_z": (k_id - mean) / math.sqrt(var),
        "found": found,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, nargs="+", default=[4096])
    ap.add_argument("--seeds", type=int, nargs="+", default=[2])
    ap.add_argument("--samples", type=int, default=400, help="random partitions per sampled row")
    ap.add_argument("--sample-rows", type=int, default=256, help="rows sampled for the moments")
    ap.add_argument(
        "--search",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also run permute_channels with this time budget and print what it reaches",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads for --search")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for c in args.cols:
        for seed in args.seeds:
            t0 = time.perf_counter()
            r = estimate(args.rows, c, seed, args.samples, args.sample_rows, args.search)
            found = r["found"]
            searched = f"  search {100 * found.efficacy:.2f}% in {found.seconds:.0f} s" if found else ""
            print(
                f"rows={args.rows} cols={c} seed={seed}: e* = {100 * r['e_star']:.2f}%  "
                f"ln E[#partitions >= 20%] = {r['log_count_at_20']:.0f} (ln #partitions {r['log_partitions']:.0f}; "
                f"identity at {r['identity_z']:+.2f} sd){searched}  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
