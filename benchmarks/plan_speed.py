"""Measured decode speed of several models on the lean runtime, interleaved, against the first (dense).

    heavy --all python benchmarks/plan_speed.py dense=smollm2-135m u24=/tmp/u24 plan13=/tmp/p13 --threads 2

Every model is packed once; then each round times ``--decode`` greedy tokens of every model in turn
(as ``python -m nmkit.runtime.bench --decode``), so drifts of the machine hit all alike. Prints JSON:
per label the median decode tokens/s over rounds and the speedup over the first label, plus, where the
model directory has a plan in its nmkit.json, the plan's predicted speedup.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from nmkit import models, sidecar
from nmkit.runtime.bench import measure
from nmkit.runtime.engine import Engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="LABEL=PATH (the first is the baseline)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--weights", default="fp32")
    args = ap.parse_args(argv)
    engines, predicted = {}, {}
    for spec in args.models:
        label, _, path = spec.partition("=")
        model = models.load(path)
        engines[label] = Engine(model, weights=args.weights, threads=args.threads, max_seq=args.decode + 2)
        del model
        if Path(path).is_dir() and sidecar.exists(path):
            plan = sidecar.read(path).get("plan")
            if plan:
                predicted[label] = plan["predicted"]["speedup"]
        print(f"packed {label}", file=sys.stderr, flush=True)
    samples = {label: [] for label in engines}
    for r in range(args.rounds):
        for label, engine in engines.items():
            samples[label].append(measure(engine, args.decode, 1, 1, seed=r)["decode_tps"])
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    base = samples[next(iter(engines))]
    # the speedup is the median of each round's ratio: both sides of a ratio were timed moments apart
    out = {label: {"decode_tps": statistics.median(s),
                   "speedup": statistics.median(x / b for x, b in zip(s, base, strict=True)),
                   "samples": s, **({"predicted_speedup": predicted[label]} if label in predicted else {})}
           for label, s in samples.items()}
    print(json.dumps({"threads": args.threads, "decode": args.decode, "rounds": args.rounds,
                      "weights": args.weights, "results": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
