"""Every CUDA check in one short run, for a session that is lent a GPU (none has been so far).

    python benchmarks/gpu_check.py --out gpu-check.json          # ~3-5 min on one H100

1. Correctness: ``nmkit.kernels.cuda.SemiStructuredLinear`` against dense ``F.linear`` on the same
   2:4 weights, fp16 and bf16, shapes that need padding, 1 to 4096 tokens.
2. Speed: dense vs 2:4 semi-structured on the issue's shapes (2048x2048, 4096x4096, 11008x4096,
   4096x11008) at 1-4096 tokens. CUDA events, dense and sparse interleaved, medians, ratio =
   dense / sparse.
3. The CUDA pruning path: ``nmkit prune smollm2-135m --method sparsegpt --device cuda`` on a small
   calibration set, with the same run on the CPU for comparison (perplexity, wall time).
4. ``pytest -q tests -k cuda`` (the tests that skip without a GPU).

Without CUDA it says so and exits 0, so it can sit in the repository and run anywhere.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = ((2048, 2048), (4096, 4096), (11008, 4096), (4096, 11008))
TOKENS = (1, 16, 64, 256, 1024, 4096)


def _pruned_linear(out_f: int, in_f: int, dtype: torch.dtype) -> torch.nn.Linear:
    from nmkit.solvers.nm import nm_mask

    lin = torch.nn.Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight.abs(), "2:4"))
    return lin.to(device="cuda", dtype=dtype)


def check_correctness() -> list[dict]:
    from nmkit.kernels.cuda import SemiStructuredLinear

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for out_f, in_f in ((72, 200), (576, 576), (1536, 576), (4096, 4096)):
            lin = _pruned_linear(out_f, in_f, dtype)
            sparse = SemiStructuredLinear.from_dense(lin)
            for tokens in (1, 7, 64, 4096):
                x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
                ref, got = F.linear(x, lin.weight, lin.bias), sparse(x)
                err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))
                rows.append({"dtype": str(dtype), "shape": f"{out_f}x{in_f}", "tokens": tokens,
                             "rel_max_err": err, "ok": err < 2e-2})
    return rows


def _time(fn, rounds: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / rounds


def check_speed(rounds: int) -> list[dict]:
    from nmkit.kernels.cuda import SemiStructuredLinear

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for out_f, in_f in SHAPES:
            lin = _pruned_linear(out_f, in_f, dtype)
            sparse = SemiStructuredLinear.from_dense(lin)
            for tokens in TOKENS:
                x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
                dense_fn = functools.partial(F.linear, x, lin.weight, lin.bias)
                sparse_fn = functools.partial(sparse, x)
                for fn in (dense_fn, sparse_fn):  # warm-up (cuSPARSELt plans, cuBLAS heuristics)
                    _time(fn, 3)
                pairs = []
                for i in range(7):  # interleaved, order alternating
                    first, second = (dense_fn, sparse_fn) if i % 2 == 0 else (sparse_fn, dense_fn)
                    a, b = _time(first, rounds), _time(second, rounds)
                    pairs.append((a, b) if i % 2 == 0 else (b, a))
                dense_ms = sorted(p[0] for p in pairs)[3]
                sparse_ms = sorted(p[1] for p in pairs)[3]
                ratios = sorted(p[0] / p[1] for p in pairs)
                rows.append({"dtype": str(dtype), "shape": f"{out_f}x{in_f}", "tokens": tokens,
                             "dense_ms": dense_ms, "sparse_ms": sparse_ms, "ratio": ratios[3]})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def check_prune(work: Path) -> list[dict]:
    nmkit = str(Path(sys.executable).with_name("nmkit"))
    rows = []
    for device in ("cuda", "cpu"):
        out = work / f"prune-{device}"
        cmd = [nmkit, "prune", "smollm2-135m", "--pattern", "2:4", "--method", "sparsegpt", "--device", device,
               "--calib-samples", "16", "--calib-seqlen", "256", "--eval-seqlen", "512", "--eval-windows", "8",
               "--out", str(out), "--overwrite", "--json"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        row = {"device": device, "rc": p.returncode, "wall_s": time.perf_counter() - t0}
        if p.returncode == 0:
            report = json.loads(p.stdout)
            row.update(ppl_dense=report["ppl_dense"], ppl_sparse=report["ppl_sparse"],
                       all_valid=report["all_valid"], prune_s=report.get("timings", {}).get("prune_s"))
        else:
            row["stderr_tail"] = p.stderr[-2000:]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    ap.add_argument("--rounds", type=int, default=20, help="calls per timed sample")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: correctness,speed,prune,pytest")
    args = ap.parse_args()
    from nmkit.kernels import cuda

    if not cuda.available():
        print("gpu_check: no CUDA device of compute capability >= 8.0 (or torch without semi-structured "
              "sparsity): nothing to check")
        return 0
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "correctness" not in skip:
        result["correctness"] = check_correctness()
        print(f"correctness: {sum(r['ok'] for r in result['correctness'])}/{len(result['correctness'])} ok",
              flush=True)
    if "speed" not in skip:
        result["speed"] = check_speed(args.rounds)
    if "prune" not in skip:
        with tempfile.TemporaryDirectory() as work:
            result["prune"] = check_prune(Path(work))
    if "pytest" not in skip:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests", "-k", "cuda"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        result["pytest"] = {"rc": p.returncode, "tail": p.stdout[-1500:]}
        print(result["pytest"]["tail"], flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    bad = [r for r in result.get("correctness", []) if not r["ok"]]
    return 1 if bad or result.get("pytest", {}).get("rc", 0) not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
