"""Decode speed of INT4 N:M with a level table against the uniform grid, same weights.

    python benchmarks/int4_level_table_speed.py PRUNED_DIR [--threads 1] [--rounds 7]

Every pruned Linear is packed twice as INT4: the uniform grid (a nibble n stands for n - 8) and the
same nibbles with the identity level table (levels[n] = n - 8), so both engines compute the same
logits (checked) and the only difference is the kernels' table lookup (one vpshufb per 64 nibbles
in place of a subtraction). Rounds of 64 greedy decode steps alternate between the two engines;
prints the median tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nmkit import models
from nmkit.runtime.engine import Engine, detect_nm
from nmkit.runtime.pack import pack


def _decode_tps(engine: Engine, steps: int = 64) -> float:
    engine.reset()
    token = int(engine.forward([1]).argmax())
    t0 = time.perf_counter()
    for _ in range(steps):
        token = int(engine.forward([token]).argmax())
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a pruned model directory (or alias)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    model = models.load(args.model)
    uniform, table = {}, {}
    for name, lin in model.named_modules():
        if name.startswith("model.layers.") and isinstance(lin, torch.nn.Linear):
            pattern = detect_nm(lin.weight)
            uniform[name] = pack(lin.weight, "int4", pattern, bias=lin.bias)
            table[name] = pack(lin.weight, "int4", pattern, bias=lin.bias)
            table[name].levels = torch.arange(-8, 8, dtype=torch.int8)
    engines = {kind: Engine(model, weights="int4", head="int8", threads=args.threads, packed=mats)
               for kind, mats in (("uniform", uniform), ("table", table))}
    same = torch.equal(engines["uniform"].forward([5]), engines["table"].forward([5]))
    samples = {kind: [] for kind in engines}
    for _ in range(args.rounds):
        for kind, engine in engines.items():
            samples[kind].append(_decode_tps(engine))
    med = {kind: statistics.median(v) for kind, v in samples.items()}
    print(f"decode tok/s, {args.threads} thread(s): uniform {med['uniform']:.1f}, table {med['table']:.1f}, "
          f"table / uniform {med['table'] / med['uniform']:.3f}; same logits: {same}")


if __name__ == "__main__":
    main()
