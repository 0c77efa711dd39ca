"""Compare the masks (and weights) of two pruned model directories, e.g. one rank against several.

    python benchmarks/compare_masks.py A B

The pruned layers are those A's report.json lists (``nmkit prune`` writes it; without it, every 2-D
``*.weight`` with zeros in A). Prints the fraction of mask entries (zero / non-zero) that agree over all
of them, how many layers have identical masks and bit-equal weights, and the least-agreeing layers.
Exits 1 if any mask entry differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from compare_weights import load_all  # a sibling script: python puts benchmarks/ on the path


def pruned_names(directory: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    report = directory / "report.json"
    if report.is_file():
        return [layer["name"] + ".weight" for layer in json.loads(report.read_text())["layers"]]
    return sorted(k for k, t in tensors.items() if k.endswith(".weight") and t.dim() == 2 and bool((t == 0).any()))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a_dir, b_dir = Path(argv[0]), Path(argv[1])
    a, b = load_all(a_dir), load_all(b_dir)
    names = pruned_names(a_dir, a)
    missing = [n for n in names if n not in b or a[n].shape != b[n].shape]
    if missing:
        raise SystemExit(f"{b_dir} lacks (or has another shape for) {missing[0]} and {len(missing) - 1} more")
    same = total = same_layers = equal_layers = 0
    per_layer = []
    for n in names:
        agree = int(((a[n] != 0) == (b[n] != 0)).sum())
        same, total = same + agree, total + a[n].numel()
        same_layers += agree == a[n].numel()
        equal_layers += bool(torch.equal(a[n], b[n]))
        per_layer.append((agree / a[n].numel(), n))
    print(f"{a_dir} vs {b_dir}: {len(names)} pruned layers, {total} mask entries")
    print(f"mask entries identical: {same / max(total, 1):.4%} ({total - same} differ)")
    print(f"layers with identical masks: {same_layers} / {len(names)}; with bit-equal weights: {equal_layers}")
    for frac, n in sorted(per_layer)[:5]:
        if frac < 1:
            print(f"  {n}: {frac:.4%}")
    return 0 if same == total else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
