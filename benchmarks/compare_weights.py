"""Compare the saved weights of two model directories bit for bit (every tensor, torch.equal).

Used to show that a refactor changes no result: prune with the same command before and after, then

    python benchmarks/compare_weights.py BEFORE_DIR AFTER_DIR [BEFORE_DIR2 AFTER_DIR2 ...]

Prints one line per pair (tensors compared, which differ) and exits 1 if any tensor differs in
name, dtype, shape or value. NaNs compare equal to NaNs at the same positions (bitwise view).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{directory}: no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():  # compare the bits, so -0.0 != +0.0 and NaN payloads count
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def compare(before: Path, after: Path) -> list[str]:
    a, b = load_all(before), load_all(after)
    problems = [f"only in {before}: {k}" for k in sorted(a.keys() - b.keys())]
    problems += [f"only in {after}: {k}" for k in sorted(b.keys() - a.keys())]
    problems += [f"differs: {k}" for k in sorted(a.keys() & b.keys()) if not bit_equal(a[k], b[k])]
    print(f"{before} vs {after}: {len(a.keys() & b.keys())} tensors compared, {len(problems)} problems")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    problems = []
    for before, after in zip(argv[::2], argv[1::2], strict=True):
        problems += compare(Path(before), Path(after))
    for p in problems[:50]:
        print("  " + p)
    print("IDENTICAL (bit for bit)" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
