"""How much 2:4 efficacy can any column permutation reach on an i.i.d. |N(0,1)| matrix?

For C columns, a permutation is a partition of the columns into C/4 groups; the kept score is the sum
over groups g of f(g) = sum over rows of the top-2 of the row's 4 values in g. This script scores every
4-subset (C choose 4 of them) and solves the set-partitioning problem exactly (HiGHS MIP, small C) and
its LP relaxation (an upper bound on every permutation, larger C), and compares the stripe-pair search.
Efficacy = (kept - kept_identity) / (kept_rowwise_unstructured - kept_identity).

    python benchmarks/permutation_ceiling.py --rows 4096 --cols 16 24 32 --seeds 2 --ilp
    python benchmarks/permutation_ceiling.py --rows 4096 --cols 48 64 --seeds 2        # LP bound only
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import coo_matrix

from nmkit.solvers.permutation import kept_by_nm, kept_by_rows, permute_channels, topn_sum


def subset_scores(w: torch.Tensor, groups: torch.Tensor, chunk: int = 4000) -> np.ndarray:
    xt = w.T.contiguous()
    out = [
        topn_sum(xt[groups[s : s + chunk]].permute(0, 2, 1), 2).double().sum(-1) for s in range(0, len(groups), chunk)
    ]
    return torch.cat(out).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, nargs="+", default=[16, 24, 32])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--ilp", action="store_true", help="also solve the exact MIP and run the stripe search")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for c in args.cols:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            w = torch.randn(args.rows, c, generator=torch.Generator().manual_seed(seed)).abs()
            kd, kr = kept_by_nm(w, "2:4"), kept_by_rows(w, 0.5)
            groups = torch.tensor(list(itertools.combinations(range(c), 4)))
            vals = subset_scores(w, groups)
            g = len(groups)
            a = coo_matrix((np.ones(4 * g), (groups.numpy().ravel(), np.repeat(np.arange(g), 4))), shape=(c, g))
            a = a.tocsr()
            lp = linprog(-vals, A_eq=a, b_eq=np.ones(c), bounds=(0, 1), method="highs")
            line = f"rows={args.rows} cols={c} seed={seed} subsets={g} LP bound {100 * (-lp.fun - kd) / (kr - kd):.2f}%"
            if args.ilp:
                res = milp(-vals, constraints=LinearConstraint(a, 1, 1), integrality=np.ones(g), bounds=Bounds(0, 1))
                r = permute_channels(w, "2:4", method="triples", time_budget_s=30, max_escapes=100)
                line += f"  optimum {100 * (-res.fun - kd) / (kr - kd):.2f}%  stripe search {100 * r.efficacy:.2f}%"
            print(f"{line}  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
