"""`nmkit bench kernels`: torch dense ``F.linear`` vs nmkit's N:M kernel on the same pruned weights.

Both run interleaved in one loop (order alternating every round) on "cold" weights: each call uses
the next of several copies, rotating through ``--cold-mb`` of memory per method, so weights stream
from DRAM as in LLM decode. Reported: median ms per method and ratio = dense time / ours (median of
per-round ratios, and the best round), at each thread count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from nmkit.formats.blocked import to_blocked
from nmkit.formats.nm import compress
from nmkit.kernels import native
from nmkit.nn import SparseLinear
from nmkit.patterns import NM
from nmkit.solvers.nm import nm_mask

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", default="2:4",
                        help="comma-separated N:M patterns (keep N of every M), e.g. 2:4,1:4,2:8")
    parser.add_argument("--shape", default="4096x4096", help="comma-separated OUTxIN shapes (nn.Linear)")
    parser.add_argument("--batch", default="1,4,16,64", help="comma-separated batch sizes (tokens)")
    parser.add_argument("--dtype", default="fp32", help="comma-separated: fp32, bf16")
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default: torch's)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per point (median)")
    parser.add_argument("--cold-mb", type=int, default=512,
                        help="weight memory rotated through per method (0 = hot, one copy)")
    parser.add_argument("--isa", default=None, choices=native.ISAS, help="force a lower ISA path")
    parser.add_argument("--kind", default="auto", choices=tuple(native.KINDS),
                        help="force a kernel: gemv, spmm, or gather (bf16 at half density; else spmm)")
    parser.add_argument("--module", action="store_true",
                        help="time SparseLinear (with its default dense fallback, e.g. bf16 from 32 tokens) "
                             "instead of the raw kernel")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="cpu: this thread's CPU time, which leaves out time preempted by other jobs "
                             "(only meaningful with --threads 1)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--seed", type=int, default=0)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


_CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}


def _time_calls(fn, args_list, clock=time.perf_counter) -> float:
    """Mean seconds per call of ``fn`` over the rotation of copies."""
    t0 = clock()
    for a in args_list:
        fn(*a)
    return (clock() - t0) / len(args_list)


def bench_point(shape: tuple[int, int], pattern: NM, dtype: torch.dtype, batches: list[int],
                threads: list[int], rounds: int, cold_mb: int, isa: str | None, kind: str,
                seed: int, clock: str = "wall", module: bool = False) -> list[dict]:
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    w = (w * nm_mask(w.abs(), pattern)).to(dtype)
    dense_bytes = w.numel() * w.element_size()
    copies = max(1, min(64, (cold_mb << 20) // dense_bytes)) if cold_mb > 0 else 1
    dense_ws = [w.clone() for _ in range(copies)]
    packed = to_blocked(compress(w, pattern))
    sparse_ws = [replace(packed, values=packed.values.clone(), mask=packed.mask.clone()) for _ in range(copies)]
    if module:
        lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype)
        lin.weight.data.copy_(w)
        proto = SparseLinear.from_dense(lin, pattern)
        sparse_ws = []
        for _ in range(copies):
            m = SparseLinear(in_f, out_f, pattern, bias=False, dtype=dtype)
            m.values, m.mask, m.dense_from_batch = proto.values.clone(), proto.mask.clone(), proto.dense_from_batch
            sparse_ws.append(m)
    results = []
    old_threads = torch.get_num_threads()
    try:
        for nt in threads:
            torch.set_num_threads(nt)
            for b in batches:
                x = torch.randn(b, in_f, generator=gen).to(dtype)
                ref = F.linear(x.float(), w.float())
                got = (sparse_ws[0](x) if module else native.linear(x, sparse_ws[0], isa=isa, kind=kind)).float()
                err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()

                def dense(wi, x=x):
                    return F.linear(x, wi)

                def ours(ti, x=x, nt=nt):
                    return ti(x) if module else native.linear(x, ti, isa=isa, kind=kind, threads=nt)

                dargs = [(wi,) for wi in dense_ws]
                sargs = [(ti,) for ti in sparse_ws]
                _time_calls(dense, dargs[:2])
                _time_calls(ours, sargs[:2])
                td, ts = [], []
                ck = _CLOCK[clock]
                for r in range(rounds):
                    if r % 2 == 0:
                        td.append(_time_calls(dense, dargs, ck))
                        ts.append(_time_calls(ours, sargs, ck))
                    else:
                        ts.append(_time_calls(ours, sargs, ck))
                        td.append(_time_calls(dense, dargs, ck))
                ratios = [a / b for a, b in zip(td, ts, strict=True)]
                results.append({
                    "shape": f"{out_f}x{in_f}", "pattern": str(pattern), "dtype": str(dtype).split(".")[-1],
                    "threads": nt, "batch": b, "dense_ms": statistics.median(td) * 1e3,
                    "ours_ms": statistics.median(ts) * 1e3, "ratio": statistics.median(ratios),
                    "ratio_best": min(td) / min(ts), "max_rel_err": err, "copies": copies,
                    "isa": isa or native.best_isa(), "kind": "SparseLinear" if module else kind, "clock": clock,
                })
    finally:
        torch.set_num_threads(old_threads)
    return results


def run(args: argparse.Namespace) -> int:
    if not native.available():
        print("nmkit native kernels are not available on this install; nothing to benchmark")
        return 1
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in _csv(args.shape)]
    patterns = [NM.parse(p) for p in _csv(args.pattern)]
    batches = [int(b) for b in _csv(args.batch)]
    threads = [int(t) for t in _csv(args.threads)] if args.threads else [torch.get_num_threads()]
    dtypes = [DTYPES[d] for d in _csv(args.dtype)]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0 = os.getloadavg()[0]
    print(f"# nmkit bench kernels  {started}  cpu={platform.processor() or platform.machine()} "
          f"isa={args.isa or native.best_isa()} torch={torch.__version__} clock={args.clock} load1={load0:.2f}")
    print("# ratio = dense ms / ours ms (median of interleaved rounds; best = min/min)")
    print(f"{'shape':>12} {'N:M':>5} {'dtype':>8} {'thr':>3} {'B':>4} {'dense ms':>9} {'ours ms':>9} "
          f"{'ratio':>6} {'best':>6}")
    rows = []
    for shape in shapes:
        for pattern in patterns:
            for dtype in dtypes:
                for r in bench_point(shape, pattern, dtype, batches, threads, args.rounds, args.cold_mb,
                                     args.isa, args.kind, args.seed, args.clock, args.module):
                    rows.append(r)
                    print(f"{r['shape']:>12} {r['pattern']:>5} {r['dtype']:>8} {r['threads']:>3} "
                          f"{r['batch']:>4} {r['dense_ms']:9.3f} {r['ours_ms']:9.3f} {r['ratio']:6.2f} "
                          f"{r['ratio_best']:6.2f}", flush=True)
    print(f"# load1 at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"started": started, "torch": torch.__version__, "load1_start": load0,
                       "results": rows}, f, indent=1)
    return 0
