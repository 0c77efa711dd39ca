"""Peak memory of `nmkit export` on a synthetic pruned checkpoint larger than the embedded model.

Writes a Llama-shaped pruned checkpoint (random 2:4 weights, zeros in place, `nmkit.json`; no real
model is needed because export only moves tensors), then runs the real CLI in a fresh process per
format and shard size and reads its peak RSS from `/usr/bin/time -v`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_memory.py --work /tmp/export-mem --gb 2

The baseline is a process that only imports nmkit, transformers and torch (what every export pays).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from nmkit import sidecar
from nmkit.solvers.nm import nm_mask

NMKIT = str(Path(sys.executable).with_name("nmkit"))
HIDDEN, INTER = 2048, 5504


def _layer_tensors(i: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
              "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
    out = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=gen) * 0.02
        out[f"model.layers.{i}.{name}.weight"] = (w * nm_mask(w.abs(), "2:4")).to(dtype)
    return out


def make_checkpoint(path: Path, gb: float, dtype: torch.dtype) -> None:
    """Enough layers for ``gb`` GB, in 1-layer source shards (as a big HF checkpoint would be)."""
    if (path / "nmkit.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    size = torch.empty(0, dtype=dtype).element_size()
    per_layer = (4 * HIDDEN * HIDDEN + 3 * INTER * HIDDEN) * size
    n_layers = max(1, round(gb * 1e9 / per_layer))
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for i in range(n_layers):
        tensors = _layer_tensors(i, dtype, gen)
        save_file(tensors, str(path / f"model-{i + 1:05d}-of-{n_layers:05d}.safetensors"), metadata={"format": "pt"})
        layers.update({k.removesuffix(".weight"): {"pattern": "2:4", "dim": 1, "shape": list(v.shape)}
                       for k, v in tensors.items()})
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "synthetic": True}) + "\n")
    sidecar.write(path, layers, pattern="2:4")


def peak_rss_mib(cmd: list[str]) -> tuple[float, str]:
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True)
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return kb / 1024, p.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/nmkit-export-mem"))
    ap.add_argument("--gb", type=float, default=2.0, help="size of the synthetic checkpoint")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shards", default="4GiB,500MB,100MB")
    args = ap.parse_args()
    src = args.work / "src"
    make_checkpoint(src, args.gb, getattr(torch, args.dtype))
    src_mib = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
    base, _ = peak_rss_mib([sys.executable, "-c", "import nmkit.formats.io, transformers, torch"])
    print(f"source: {src_mib:.0f} MiB ({args.dtype}); imports alone: {base:.0f} MiB peak RSS")
    for fmt, codec in (("dense", "none"), ("nmkit", "none"), ("nmkit", "zstd")):
        for shard in args.shards.split(","):
            out = args.work / "out"
            shutil.rmtree(out, ignore_errors=True)
            rss, line = peak_rss_mib([NMKIT, "export", str(src), "--format", fmt, "--codec", codec,
                                      "--max-shard-size", shard, "--out", str(out)])
            print(json.dumps({"format": fmt, "codec": codec, "max_shard_size": shard, "peak_rss_mib": round(rss),
                              "source_mib": round(src_mib), "summary": line}), flush=True)


if __name__ == "__main__":
    main()
