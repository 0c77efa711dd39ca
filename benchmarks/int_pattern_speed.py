"""Whole decode steps of a 2:8 model on the integer kinds: packed row by row as 2:8 against packed as
2:4 (what ``pack.integer_pattern`` does; a 2:8 weight follows 2:4), with the dense model beside.

    nmkit prune smollm2-135m --pattern 2:8 --method magnitude --out /work/out/mag-2-8 --no-eval
    python benchmarks/int_pattern_speed.py /work/out/mag-2-8 THREADS

Nine interleaved rounds of 32 steps; medians in ms and the bytes each step reads.
"""

from __future__ import annotations

import statistics
import sys

import nmkit.runtime.engine as eng
import nmkit.runtime.pack as pack
from nmkit import models
from nmkit.plan.profile import time_step

path, th = sys.argv[1], int(sys.argv[2])
m = models.load(path)
engines = {}
for kind in ("int4", "int8"):
    engines[f"{kind} 2:8 as 2:4"] = eng.Engine(m, weights=kind, threads=th, max_seq=40)
    chosen = pack.integer_pattern
    pack.integer_pattern = lambda p: pack.unit_pattern(p)  # the row-by-row 2:8 path, as before
    try:
        engines[f"{kind} 2:8 rows"] = eng.Engine(m, weights=kind, threads=th, max_seq=40)
    finally:
        pack.integer_pattern = chosen
    engines[f"{kind} dense"] = eng.Engine(models.load("smollm2-135m"), weights=kind, threads=th, max_seq=40)
s = {k: [] for k in engines}
for _ in range(9):
    for k, e in engines.items():
        s[k].append(time_step(e, 1, 32))
for k, v in s.items():
    print(th, k, round(1e3 * statistics.median(v), 2), "ms", engines[k].info.weight_bytes // 2**20, "MiB")
