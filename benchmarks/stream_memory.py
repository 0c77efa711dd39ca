"""Peak memory of a streamed prune against depth: synthetic checkpoints of one width, several depths.

    python benchmarks/stream_memory.py --layers 6 23 [--hidden 2048] [--params 1e9] [--work /tmp/sm]

For each depth: writes a random-weight Llama checkpoint (``synthetic_llama.py``), runs
``nmkit prune DIR --stream --method wanda --calib-samples 8 --calib-seqlen 256 --no-eval`` with one
thread, and samples the prune's ``/proc/PID/status`` every 0.1 s: peak anonymous memory (what the
prune needs), peak file-backed memory (libraries and the memory-mapped input shards: page cache the
kernel can reclaim) and peak RSS. Linux only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(layers: int, args: argparse.Namespace) -> dict[str, float]:
    work = Path(args.work)
    model, out = work / f"syn{layers}", work / f"syn{layers}-out"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, str(HERE / "synthetic_llama.py"), "--params", str(args.params), "--hidden",
                    str(args.hidden), "--layers", str(layers), "--out", str(model)], check=True,
                   stdout=subprocess.DEVNULL)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nmkit = shutil.which("nmkit") or sys.exit("nmkit is not on PATH; activate the environment it is installed in")
    cmd = [nmkit, "prune", str(model), "--stream", "--method", "wanda", "--calib-samples",
           "8", "--calib-seqlen", "256", "--out", str(out), "--no-eval"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    anon_at, trace, last = 0.0, [], 0.0
    while proc.poll() is None:
        now = time.perf_counter() - start
        if args.trace and now - last >= 5:
            trace.append(f"{now:.0f}s {_status(proc.pid).get('RssAnon', 0) / 1e9:.2f}")
            last = now
        for key, value in _status(proc.pid).items():
            if key == "RssAnon" and value > peak[key]:
                anon_at = time.perf_counter() - start
            peak[key] = max(peak[key], value)
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"prune of {model} failed with exit code {proc.returncode}; run it by hand: {' '.join(cmd)}")
    shutil.rmtree(model, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    if trace:
        print(f"{layers} blocks, anonymous GB every 5 s: " + ", ".join(trace), file=sys.stderr)
    return {"layers": layers, "wall_s": wall, "anon_peak_at_s": anon_at, **{k: v / 1e9 for k, v in peak.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 23])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--params", type=float, default=1e9, help="sets the MLP width with --hidden (default 1e9)")
    ap.add_argument("--work", default="/tmp/stream_memory")
    ap.add_argument("--trace", action="store_true", help="also print anonymous memory every 5 s (stderr)")
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    print("| blocks | peak anonymous GB | peak file-backed GB | peak RSS GB | wall s | anonymous peak at s |")
    print("|---|---|---|---|---|---|")
    for layers in args.layers:
        r = measure(layers, args)
        cells = [f"{r[k]:.2f}" for k in ("RssAnon", "RssFile", "VmRSS")]
        print(f"| {layers} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} | {r['anon_peak_at_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
