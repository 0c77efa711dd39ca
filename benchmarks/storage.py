"""Storage table for BENCHMARKS.md: `nmkit export` of a pruned checkpoint in every format, fp32 and a
bf16 copy: file sizes, ratios, round trip, export and load times.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/storage.py out/bench-mag-2-4 --work /tmp/storage

Export runs the real CLI (`nmkit export`, a fresh process: imports included); its CPU time is the
child's user + system time. Load is `nmkit.load(OUT)` for the nmkit format (SparseLinear layers) and
the dense directory (plain transformers), each in a fresh process, timed after `import transformers`
(the import is reported separately), and once more in the same process: the first load also pays
for transformers importing the model's code (~1.5 s here), the second is nmkit's own work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from nmkit.formats import codec as tensor_codec
from nmkit.formats.io import SIDECAR, _read_tensors, read_ct24, read_pruned

NMKIT = str(Path(sys.executable).with_name("nmkit"))
# (format, codec): every export format, and the nmkit format once more entropy-coded.
FORMATS = (("dense", "none"), ("nmkit", "none"), ("nmkit", "zstd"), ("compressed-tensors-24", "none"))

LOAD_CHILD = r"""
import json, sys, time
import torch
c0, t0 = time.process_time(), time.perf_counter()
import transformers, nmkit  # noqa
imp = time.perf_counter() - t0
c1, t1 = time.process_time(), time.perf_counter()
model = nmkit.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
c2, t2 = time.process_time(), time.perf_counter()
nmkit.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]))  # again: without transformers' first-use imports
c3 = time.process_time()
from nmkit.nn import SparseLinear
sparse = sum(isinstance(m, SparseLinear) for m in model.modules())
print(json.dumps({"import_wall": imp, "load_wall": t2 - t1, "load_cpu": c2 - c1,
                  "second_load_cpu": c3 - c2, "sparse_layers": sparse}))
"""


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _cast_copy(src: Path, dst: Path, dtype: str) -> None:
    if (dst / SIDECAR).is_file():
        return
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in _read_tensors(src).items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def _mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def _stored_bytes(path: Path) -> dict[str, int]:
    """Bytes each tensor takes in the file as stored (coded tensors: their compressed planes)."""
    sizes = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        for k in fh.keys():
            t = fh.get_tensor(k)
            sizes[k] = t.numel() * t.element_size()
    return sizes


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _compare(back: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> str:
    """'bit exact', or 'exact (-0.0 -> +0.0)' when only the sign of some zeros changed, else 'DIFFERS'."""
    if back.keys() != ref.keys() or not all(torch.equal(back[k], ref[k]) for k in ref):
        return "DIFFERS"
    floats = [k for k in ref if ref[k].is_floating_point()]
    if all(torch.equal(_bits(back[k]), _bits(ref[k])) for k in floats):
        return "bit exact"
    flipped = sum(int((_bits(back[k]) != _bits(ref[k])).sum()) for k in floats)
    return f"exact (== everywhere; {flipped} -0.0 -> +0.0)"


def run(src: Path, work: Path, dtype: str, load: bool = True) -> list[dict]:
    rows = []
    ref, sidecar = read_pruned(src)
    pruned = [f"{name}.weight" for name in sidecar["layers"]]
    pruned_dense = sum(ref[k].numel() * ref[k].element_size() for k in pruned)
    dense_mib = None
    for fmt, codec in FORMATS:
        out = work / f"{dtype}-{fmt}" if codec == "none" else work / f"{dtype}-{fmt}-{codec}"
        runs = []
        for _ in range(2):  # best of 2 by CPU time (the machine is shared)
            shutil.rmtree(out, ignore_errors=True)
            c0, t0 = _children_cpu(), time.perf_counter()
            subprocess.run([NMKIT, "export", str(src), "--format", fmt, "--codec", codec, "--out", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
            runs.append((_children_cpu() - c0, time.perf_counter() - t0))
        cpu, wall = min(runs)
        mib = _mib(out)
        dense_mib = dense_mib or mib
        row = {"dtype": dtype, "format": fmt, "codec": codec, "file_mib": mib, "vs_dense": mib / dense_mib,
               "export_wall_s": wall, "export_cpu_s": cpu}
        if codec != "none":
            # The same codec on the dense tensors: what N:M adds over entropy coding alone.
            coded, _ = tensor_codec.encode(ref)
            dense_coded = sum(v.numel() for v in coded.values()) / 2**20
            row["dense_same_codec_mib"] = dense_coded
            row["vs_dense_same_codec"] = mib / dense_coded
        if fmt == "nmkit":
            stored = _stored_bytes(out)
            comp = sum(stored[k + s] for k in sidecar["layers"] for s in (".weight_values", ".weight_mask"))
            row["pruned_only"] = f"{pruned_dense / 2**20:.1f} -> {comp / 2**20:.1f} MiB = {comp / pruned_dense:.4f}x"
            back, _ = read_pruned(out)
            row["round_trip"] = _compare(back, ref)
        if fmt == "dense":
            row["round_trip"] = _compare(read_pruned(out)[0], ref)
        if fmt == "compressed-tensors-24":
            row["round_trip"] = _compare(read_ct24(out), ref)
        if load and fmt in ("dense", "nmkit"):  # load time: see LOAD_CHILD
            loads = []
            for _ in range(2):
                env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
                p = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(out), dtype], check=True,
                                   capture_output=True, text=True, env=env)
                loads.append(json.loads(p.stdout.strip().splitlines()[-1]))
            best = min(loads, key=lambda d: d["load_cpu"])
            row.update({f"load_{k}": v for k, v in best.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a pruned directory written by `nmkit prune` (fp32)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/nmkit-storage"))
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--no-load", action="store_true",
                    help="skip the load timing (nmkit.load builds causal LMs; use this for encoders)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for dtype in args.dtypes.split(","):
        src = args.src
        if dtype != "float32":  # a cast copy of the (fp32) source
            src = args.work / f"src-{dtype}"
            _cast_copy(args.src, src, dtype)
        rows += run(src, args.work, dtype, load=not args.no_load)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
