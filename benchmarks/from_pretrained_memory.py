"""Peak memory of ``AutoModelForCausalLM.from_pretrained`` on nmkit exports of SmolLM2-135M vs the dense model.

Prunes SmolLM2-135M 2:4 by magnitude (the memory does not depend on the method), writes the pruned
directory in ``--dtype``, exports it as ``dense``, ``nmkit`` and ``nmkit --codec zstd``, then loads each
with ``from_pretrained(dtype="auto")`` in a fresh process (nmkit imported). Each process reports its
peak RSS (VmHWM) and anonymous RSS after the imports and after the load plus one forward pass (a
dense file is mapped and read lazily, so the forward makes it count), and the bytes of the tensors
the loaded model holds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/from_pretrained_memory.py --work /tmp/fp-mem --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from nmkit import models, sidecar
from nmkit.formats.io import export
from nmkit.solvers.nm import nm_mask

CHILD = """
import sys
import torch, nmkit
from transformers import AutoModelForCausalLM
import transformers.quantizers.auto  # noqa: F401  (registers nmkit's quantizer before the baseline)

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return [int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "RssAnon")]

base_peak, base_anon = status()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
with torch.inference_mode():
    model(torch.ones(1, 8, dtype=torch.long))  # touch every weight (mapped files are read lazily)
peak, anon = status()
storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*model.parameters(), *model.buffers()]}
sparse = sum(type(m).__name__ == "SparseLinear" for m in model.modules())
print(peak - base_peak, anon - base_anon, sum(storages.values()), sparse)
"""


def prune(work: Path, dtype: torch.dtype) -> tuple[Path, int]:
    """Magnitude 2:4 SmolLM2 in ``dtype``; returns its directory and the dense tensor bytes."""
    out = work / f"pruned-{str(dtype).removeprefix('torch.')}"
    model = models.load("smollm2-135m", dtype=dtype)
    layers = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and "lm_head" not in name:
                mod.weight.mul_(nm_mask(mod.weight.abs(), "2:4").to(mod.weight.dtype))
                layers[name] = {"pattern": "2:4", "dim": 1, "shape": list(mod.weight.shape)}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.parameters()}
    dense_bytes = sum(storages.values())  # tied embeddings once
    if not (out / "nmkit.json").is_file():
        model.save_pretrained(out)
        models.load_tokenizer("smollm2-135m").save_pretrained(out)
        sidecar.write(out, layers, pattern="2:4", method="magnitude")
    return out, dense_bytes


def measure(directory: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(directory)], capture_output=True, text=True, check=True)
    peak, anon, live, sparse = (int(v) for v in result.stdout.split()[-4:])
    return {"peak_rss_increase": peak, "anon_rss_increase": anon, "live_tensor_bytes": live, "sparse_layers": sparse}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fp-mem"))
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src, dense_bytes = prune(args.work, getattr(torch, args.dtype))
    rows = {}
    for label, fmt, codec in [("dense", "dense", "none"), ("nmkit", "nmkit", "none"), ("nmkit-zstd", "nmkit", "zstd")]:
        out = args.work / f"{src.name}-{label}"
        summary = export(src, fmt, out, codec=codec)
        rows[label] = {"file_bytes": summary["bytes"], **measure(out)}
    report = {"model": "smollm2-135m 2:4 (magnitude)", "dtype": args.dtype, "dense_model_bytes": dense_bytes,
              "torch": torch.__version__, "transformers": __import__("transformers").__version__, "loads": rows}
    print(json.dumps(report, indent=2))
    mib = 2**20
    print(f"dense model tensors: {dense_bytes / mib:.1f} MiB ({args.dtype})")
    for label, r in rows.items():
        print(f"{label:<11} file {r['file_bytes'] / mib:6.1f} MiB"
              f" | live tensors {r['live_tensor_bytes'] / mib:6.1f} MiB"
              f" | peak RSS +{r['peak_rss_increase'] / mib:6.1f} MiB (anon +{r['anon_rss_increase'] / mib:6.1f})"
              f" | SparseLinear layers {r['sparse_layers']}")

if __name__ == "__main__":
    main()
