"""Measured decode speed of several models on the lean runtime, interleaved, against the first (dense).

    heavy --all python benchmarks/plan_speed.py dense=smollm2-135m u24=/tmp/u24 plan13=/tmp/p13 --threads 2
    heavy --all python benchmarks/plan_speed.py dense=smollm2-135m u24=2:4 p16=plan-1.6.json --base smollm2-135m

A PATH is a model (alias or directory); with ``--base MODEL``, it may also be an N:M pattern or a
plan.json, applied to the base's weights in memory by magnitude (decode speed depends on each
layer's pattern, not on which weights are kept). Every model is packed once; then each round times
``--decode`` greedy tokens of every model in turn (as ``python -m nmkit.runtime.bench --decode``), so
drifts of the machine hit all alike. Prints JSON:
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
from nmkit.oneshot import prune
from nmkit.plan import planfile
from nmkit.runtime.bench import measure
from nmkit.runtime.engine import Engine


def _load(path: str, base: str | None):
    if base is None or Path(path).is_dir() or ":" not in path and not path.endswith(".json"):
        return models.load(path)
    model = models.load(base)
    if path.endswith(".json"):
        layers = {n: p for n, p in planfile.read(path)["layers"].items() if p != "dense"}
        prune(model, "2:4", "magnitude", include=sorted(layers), layer_patterns=layers, progress=False)
    else:
        prune(model, path, "magnitude", progress=False)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="LABEL=PATH (the first is the baseline)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--weights", default="fp32")
    ap.add_argument("--base", default=None, help="model that patterns and plan files are applied to")
    args = ap.parse_args(argv)
    engines, predicted = {}, {}
    for spec in args.models:
        label, _, path = spec.partition("=")
        model = _load(path, args.base)
        if path.endswith(".json"):
            predicted[label] = planfile.read(path)["predicted"]["speedup"]
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
