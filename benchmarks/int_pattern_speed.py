"""Whole decode steps of a sparse model on the integer kinds: decoded from 16-row tiles (what the runtime
does for every pattern keeping 4 or 8 of 16 inputs) against the older row-by-row path, with the dense
model beside, and for 2:8 also the weights packed as 2:4 (a 2:8 weight follows 2:4).

    nmkit prune smollm2-135m --pattern 4:8 --method magnitude --out /work/out/mag-4-8 --no-eval
    python benchmarks/int_pattern_speed.py /work/out/mag-4-8 THREADS [ROUNDS]

Interleaved rounds (default 9) of 32 steps; medians in ms, ratios to dense, and the bytes each step reads.
"""

from __future__ import annotations

import statistics
import sys
from contextlib import contextmanager

import nmkit.runtime.engine as eng
import nmkit.runtime.pack as pack
from nmkit import models
from nmkit.patterns import NM
from nmkit.plan.profile import time_step


@contextmanager
def row_path():
    """Sparse integer matrices decode row by row, as before the nibble tiles."""
    tiled = pack.PackedMat.quant_tiled
    pack.PackedMat.quant_tiled = property(lambda p: p.kind in ("int8", "int4") and (p.pattern is None or p.by_pairs))
    try:
        yield
    finally:
        pack.PackedMat.quant_tiled = tiled


@contextmanager
def as_2of4():
    chosen = pack.unit_pattern
    pack.unit_pattern = lambda p: NM(2, 4) if p == NM(2, 8) else chosen(p)
    try:
        yield
    finally:
        pack.unit_pattern = chosen


def main() -> None:
    path, th = sys.argv[1], int(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 9
    m = models.load(path)
    dense = models.load("smollm2-135m")
    engines = {}
    for kind in ("int4", "int8"):
        engines[f"{kind} tiles"] = eng.Engine(m, weights=kind, threads=th, max_seq=40)
        with row_path():
            engines[f"{kind} rows"] = eng.Engine(m, weights=kind, threads=th, max_seq=40)
        if "2-8" in path:
            with as_2of4():
                engines[f"{kind} as 2:4"] = eng.Engine(m, weights=kind, threads=th, max_seq=40)
        engines[f"{kind} dense"] = eng.Engine(dense, weights=kind, threads=th, max_seq=40)
    s = {k: [] for k in engines}
    for _ in range(rounds):
        for k, e in engines.items():
            s[k].append(time_step(e, 1, 32))
    for k, v in s.items():
        ms, base = statistics.median(v), statistics.median(s[k.split()[0] + " dense"])
        print(f"threads {th}  {k:14s} {1e3 * ms:6.2f} ms  dense/this {base / ms:.2f}x"
              f"  {engines[k].info.weight_bytes / 2**20:6.1f} MiB")


if __name__ == "__main__":
    main()
