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
import time

import torch

from nmkit.bench.first_moment import first_moment_ceiling
from nmkit.solvers.permutation import permute_channels


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
            x = torch.randn(args.rows, c, generator=torch.Generator().manual_seed(seed)).abs()
            found = permute_channels(x, "2:4", time_budget_s=args.search) if args.search > 0 else None
            r = first_moment_ceiling(x, args.samples, args.sample_rows, seed)
            searched = f"  search {100 * found.efficacy:.2f}% in {found.seconds:.0f} s" if found else ""
            print(
                f"rows={args.rows} cols={c} seed={seed}: e* = {100 * r.e_star:.2f}%  "
                f"ln E[#partitions >= 20%] = {r.log_count_at_20:.0f} (ln #partitions {r.log_partitions:.0f}; "
                f"identity at {r.identity_z:+.2f} sd){searched}  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
