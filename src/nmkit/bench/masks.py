"""`nmkit bench masks`: a fixed, seeded suite of mask-solver quality and wall time.

Sections: transposable N:M (error vs the exact LP optimum, validity, time; 8192x8192 8:16 speed),
channel permutations (apex's random 128x64 matrix, 4096x4096 Gaussian; 2:8 and 8:16 on 576x1536),
V:N:M, HiNM, TASD.
Quality figures are deterministic; times depend on the machine and its load (reported with them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone

import numpy as np
import torch

from nmkit.bench.first_moment import first_moment_ceiling
from nmkit.patterns import NM, VNM, HiNM, Transposable
from nmkit.solvers import mask_for, native
from nmkit.solvers.hinm import hinm_mask, hinm_permute
from nmkit.solvers.nm import topk_mask
from nmkit.solvers.permutation import permute_channels
from nmkit.solvers.tasd import tasd_decompose
from nmkit.solvers.transposable import _exact_lp, from_tiles, tile_score, to_tiles, transposable_mask
from nmkit.solvers.vnm import vnm_mask, vnm_permute

SECTIONS = ("transposable", "transposable_speed", "permutation", "vnm", "hinm", "tasd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="small sizes and short budgets (smoke test)")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=None, metavar="SECTION", help=f"run only {SECTIONS}"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--perm-budget", type=float, default=None, help="seconds for the 4096x4096 permutation")


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _permutation_row(
    matrix: str, budget: float, r, seconds: float, cpu: float, pattern: str = "2:4", ceiling: float | None = None
) -> dict:
    """`ceiling_est_pct`: the first-moment estimate of the best 2:4 efficacy of an i.i.d. matrix
    (nmkit.bench.first_moment), so a figure can be read against what any permutation could reach."""
    return {"section": "permutation", "matrix": matrix, "pattern": pattern, "budget_s": budget, "method": r.method,
            "efficacy_pct": 100 * r.efficacy, "ceiling_est_pct": "-" if ceiling is None else 100 * ceiling,
            "kept": r.kept, "kept_default": r.kept_default, "seconds": seconds, "cpu_s": cpu}


def _timed_cpu(fn):
    """(result, wall seconds, process CPU seconds): CPU time shows the cost when the box is shared."""
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def _gauss(n: int, m: int, seed: int) -> torch.Tensor:
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed))


def _transposable(rows: list, quick: bool) -> None:
    size = 256 if quick else 1024
    w = _gauss(size, size, 0).abs()
    total = float(w.double().sum())
    for n, m in [(2, 4), (4, 8), (8, 16), (16, 32)]:
        pat = Transposable(n, m)
        exact, t_exact = _timed(lambda pat=pat: transposable_mask(w, pat, "exact"))
        opt = tile_score(w, exact)
        rec = {"section": "transposable", "shape": f"{size}x{size}", "pattern": str(pat), "exact_s": t_exact}
        if m == 4:  # the 90-pattern matmul against the LP on a 256x256 corner

            c = w[:256, :256]
            lp = from_tiles(_exact_lp(to_tiles(c, m), n, m), c.shape, m)
            rec["exact_vs_lp_256"] = tile_score(c, transposable_mask(c, pat, "exact")) - tile_score(c, lp)
        for method in ("greedy", "fast", "optimal", "entropic"):
            mk, t = _timed(lambda method=method, pat=pat: transposable_mask(w, pat, method))
            rec[f"{method}_err_pct"] = 100 * (opt - tile_score(w, mk)) / (total - opt)
            rec[f"{method}_s"] = t
            rec[f"{method}_valid"] = pat.is_valid(mk)
        rec["exact_valid"] = pat.is_valid(exact, exact=True)
        rows.append(rec)


def _transposable_speed(rows: list, quick: bool) -> None:
    size = 2048 if quick else 8192
    w = _gauss(size, size, 1).abs()
    pat = Transposable(8, 16)
    total = float(w.double().sum())
    recs, opt = [], None
    for method in ("auto", "fast", "greedy", "optimal"):
        mk, t, cpu = _timed_cpu(lambda method=method: transposable_mask(w, pat, method))
        kept = float((w.double() * mk).sum())
        opt = kept if method == "optimal" else opt
        recs.append(
            {
                "section": "transposable_speed",
                "shape": f"{size}x{size}",
                "pattern": str(pat),
                "method": method,
                "backend": "compiled" if native.available() else "torch",
                "threads": torch.get_num_threads(),
                "seconds": t,
                "cpu_s": cpu,
                "kept": kept,
                "valid": pat.is_valid(mk),
                "exact_n": pat.is_valid(mk, exact=True),
            }
        )
    for rec in recs:  # error on the pruned magnitude vs the optimum (the compiled solver is exact)
        rec["err_vs_optimal_pct"] = 100 * (opt - rec["kept"]) / (total - opt)
    rows.extend(recs)


def _permutation(rows: list, quick: bool, budget_big: float | None) -> None:
    np.random.seed(1)  # apex permutation_tests: --seed 1, np.random.rand(filters=128, channels=64)
    apex = torch.from_numpy(np.random.rand(128, 64))
    ceiling = first_moment_ceiling(apex).e_star
    for budget in (1.0,) if quick else (1.0, 3.0):
        timed = _timed_cpu(lambda budget=budget: permute_channels(apex, "2:4", time_budget_s=budget))
        rows.append(_permutation_row("apex random 128x64 (seed 1, uniform)", budget, *timed, ceiling=ceiling))
    size = 512 if quick else 4096
    big = _gauss(size, size, 2).abs()
    budget = budget_big if budget_big is not None else (5.0 if quick else 55.0)
    timed = _timed_cpu(lambda: permute_channels(big, "2:4", time_budget_s=budget))
    ceiling = first_moment_ceiling(big).e_star
    rows.append(_permutation_row(f"|N(0,1)| {size}x{size} (seed 2)", budget, *timed, ceiling=ceiling))
    # wider groups (compiled column reassignment, M <= 32) on the shape of SmolLM2's down_proj
    wide, budget = _gauss(576, 1536, 0).abs(), 1.0 if quick else 5.0
    for pattern in ("2:8", "8:16"):
        timed = _timed_cpu(lambda pattern=pattern: permute_channels(wide, pattern, time_budget_s=budget))
        rows.append(_permutation_row("|N(0,1)| 576x1536 (seed 0)", budget, *timed, pattern=pattern))


def _vnm(rows: list, quick: bool) -> None:
    size = 256 if quick else 1024
    w = _gauss(size, size, 3).abs()
    nm_kept = float((w * mask_for(w, NM(2, 8))).sum())
    for v in (16, 64):
        p = VNM(v, 2, 8)
        rec = {"section": "vnm", "shape": f"{size}x{size}", "pattern": str(p), "nm_2:8_kept": nm_kept}
        for method in ("exhaustive", "l1"):
            mk, t = _timed(lambda method=method, p=p: vnm_mask(w, p, method))
            rec[f"{method}_kept"] = float((w * mk).sum())
            rec[f"{method}_s"] = t
            rec[f"{method}_valid"] = p.is_valid(mk, exact=True)
        r = vnm_permute(w, p, time_budget_s=1.0 if quick else 5.0)
        rec["perm_gain_pct"] = 100 * (r.kept / r.kept_default - 1)
        rec["perm_s"] = r.seconds
        rows.append(rec)


def _hinm(rows: list, quick: bool) -> None:
    size = 256 if quick else 1024
    w = _gauss(size, size, 4).abs()
    p = HiNM(64 if not quick else 16, 0.5, NM(2, 4))
    mk, t = _timed(lambda: hinm_mask(w, p))
    budget = 1.0 if quick else 5.0
    for method in ("auto", "swaps"):
        r = hinm_permute(w, p, time_budget_s=budget, method=method)
        rows.append(
            {
                "section": "hinm",
                "shape": f"{size}x{size}",
                "pattern": str(p),
                "kept": float((w * mk).sum()),
                "nm_1:4_kept": float((w * mask_for(w, NM(1, 4))).sum()),
                "seconds": t,
                "valid": p.is_valid(mk, exact=True),
                "row_perm": r.method,
                "row_perm_gain_pct": 100 * (r.kept / r.kept_default - 1),
                "perm_s": r.seconds,
            }
        )


def _tasd(rows: list, quick: bool) -> None:
    size = 256 if quick else 1024
    a = _gauss(size, size, 5)
    a = a * topk_mask(a.abs().reshape(-1), a.numel() // 4).reshape(a.shape)  # 75% unstructured sparse
    series = [
        ["1:4"], ["2:8"], ["4:16"], ["1:8", "1:8"],
        ["2:4"], ["4:8"], ["1:2"], ["1:4", "1:4"], ["1:4", "2:8"], ["2:8", "1:4"], ["2:8", "2:8"],
        ["3:4"], ["6:8"], ["2:4", "1:4"], ["2:4", "2:8"],
        ["3:8"], ["1:4", "1:8"],
    ]  # fmt: skip
    for terms in series:
        for offsets in ("aligned", "staggered") if len(terms) > 1 else ("aligned",):
            r = tasd_decompose(a, terms, offsets=0 if offsets == "aligned" else "auto")
            rows.append(
                {
                    "section": "tasd",
                    "shape": f"{size}x{size}, 75% unstructured",
                    "terms": "+".join(terms),
                    "groups": offsets,
                    "offsets": ",".join(map(str, r.offsets)),
                    "density": r.density,
                    "rel_error": r.rel_errors[-1],
                }
            )


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")  # a cell such as "|N(0,1)|" must not split the Markdown row


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)  # a CLI process, so setting it here is ours to do
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    sections = args.only or SECTIONS
    rows: list[dict] = []
    t0 = time.perf_counter()
    for s in sections:
        if s == "transposable":
            _transposable(rows, args.quick)
        elif s == "transposable_speed":
            _transposable_speed(rows, args.quick)
        elif s == "permutation":
            _permutation(rows, args.quick, args.perm_budget)
        elif s == "vnm":
            _vnm(rows, args.quick)
        elif s == "hinm":
            _hinm(rows, args.quick)
        elif s == "tasd":
            _tasd(rows, args.quick)
    meta = {
        "started": started,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "load1_start": load0,
        "load1_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "total_s": time.perf_counter() - t0,
        "quick": bool(args.quick),
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=1))
        return 0
    print(f"# nmkit bench masks  ({meta['started']}; {meta['machine']}; load {load0})")
    current = None
    for rec in rows:
        if rec["section"] != current:
            current = rec["section"]
            keys = [k for k in rec if k != "section"]
            print(f"\n## {current}\n\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        print("| " + " | ".join(_fmt(rec.get(k, "")) for k in keys) + " |")
    print(f"\ntotal {meta['total_s']:.1f} s")
    return 0
