"""Channel-permutation efficacy and time per N:M pattern and matrix shape, on seeded |N(0,1)| matrices.

Run it twice to compare the compiled search with the torch one (`NMKIT_NATIVE=0` turns the compiled
solvers off):

    python benchmarks/permutation_patterns.py --patterns 2:8 4:8 8:16 --shapes 576x1536 1536x576 --budget 5
    NMKIT_NATIVE=0 python benchmarks/permutation_patterns.py ...   # the torch path
"""

from __future__ import annotations

import argparse

import torch

from nmkit.solvers.permutation import permute_channels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", nargs="+", default=["2:8", "4:8", "8:16"])
    ap.add_argument("--shapes", nargs="+", default=["576x1536", "1536x576"], help="ROWSxCOLS")
    ap.add_argument("--budget", type=float, default=5.0, help="seconds per search")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--anneal", action="store_true", help="anneal over the budget (default: converge, as --permute)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for shape in args.shapes:
        rows, cols = (int(v) for v in shape.split("x"))
        for seed in args.seeds:
            w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).abs()
            for pattern in args.patterns:
                r = permute_channels(w, pattern, time_budget_s=args.budget, max_escapes=None if args.anneal else 0)
                print(
                    f"{shape} seed {seed} {pattern}: efficacy {100 * r.efficacy:.2f}% in {r.seconds:.2f} s "
                    f"({r.method})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
