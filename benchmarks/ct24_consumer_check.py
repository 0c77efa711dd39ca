"""Does the compressed-tensors-24 export load right in the only stack that decodes it?

compressed-tensors removed its sparse-24-bitmask decompressor after 0.14.0.1, and transformers 5
needs compressed-tensors >= 0.15, so the consumer stack is compressed-tensors 0.14.0.1 + transformers
4.57. This script builds that stack in its own virtual environment (``--work/venv``) with pip: the torch
version of this environment (``--torch-index URL`` adds an index for it, e.g. PyTorch's CPU wheels),
then the stack from the package index pip is configured with. It loads the export there with plain
``AutoModelForCausalLM`` / ``AutoTokenizer`` (no nmkit), greedy-decodes a prompt, and compares the
tokens with the dense export decoded by this environment's transformers.

    .venv/bin/python benchmarks/ct24_consumer_check.py PRUNED_DIR --work /tmp/ct24-check

With equal tokens it also reports the largest difference between the two stacks' logits over the
whole sequence (``max_abs_logit_diff``). Exit status 0 when the tokens are equal, 1 when they differ,
2 with one line when the check could not run (no pruned directory, or the stack could not be
installed, e.g. without network access).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STACK = ["compressed-tensors==0.14.0.1", "transformers>=4.57,<4.58", "safetensors", "accelerate"]
PROMPT = "The capital of France is"
DECODE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import transformers
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype="auto").eval()
ids = tok(sys.argv[2], return_tensors="pt").input_ids
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=int(sys.argv[3]), do_sample=False)
    torch.save(model(out).logits[0].float(), sys.argv[4])  # every position of its own sequence
versions = {"transformers": transformers.__version__, "torch": torch.__version__}
try:
    import compressed_tensors
    versions["compressed_tensors"] = compressed_tensors.__version__
except ImportError:
    pass
print(json.dumps({"tokens": out[0].tolist(), "dtype": str(model.dtype), "versions": versions}))
"""


class CheckError(Exception):
    """The check could not run; the message is the one line to print."""


def _pip(python: str, *args: str) -> None:
    result = subprocess.run([python, "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CheckError(f"could not install {' '.join(a for a in args if not a.startswith('-'))} into the "
                         f"consumer environment (network or index needed): {last}")


def _consumer_python(venv: Path, torch_index: str | None) -> str:
    """The consumer stack's interpreter, built on first use (a half-built one is rebuilt)."""
    import torch

    python = str(venv / "bin" / "python")
    if (venv / "ready").is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    _pip(python, f"torch=={torch.__version__}", *(["--extra-index-url", torch_index] if torch_index else []))
    _pip(python, *STACK)
    (venv / "ready").write_text(" ".join(STACK) + "\n")
    return python


def _decode(python: str, directory: Path, tokens: int) -> dict:
    logits = directory.parent / f"{directory.name}-logits.pt"
    out = subprocess.run([python, "-c", DECODE, str(directory), PROMPT, str(tokens), str(logits)], capture_output=True,
                         text=True)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CheckError(f"decoding {directory} with {python} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pruned", type=Path, help="a 2:4 directory written by `nmkit prune`")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ct24-check"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--torch-index", default=None, metavar="URL",
                        help="an extra pip index that has this environment's torch build (e.g. PyTorch's CPU wheels)")
    args = parser.parse_args()
    from nmkit.errors import UserError
    from nmkit.formats.io import export

    try:
        if not (args.pruned / "nmkit.json").is_file():
            raise CheckError(f"{args.pruned} is not a pruned directory (no nmkit.json): run `nmkit prune --out DIR`")
        args.work.mkdir(parents=True, exist_ok=True)
        export(args.pruned, "dense", args.work / "dense")
        export(args.pruned, "compressed-tensors-24", args.work / "ct24")
        python = _consumer_python(args.work / "venv", args.torch_index)
        reference = _decode(sys.executable, args.work / "dense", args.tokens)
        consumer = _decode(python, args.work / "ct24", args.tokens)
    except (CheckError, UserError) as e:
        print(f"ct24_consumer_check: {e}", file=sys.stderr)
        return 2
    import torch

    equal = reference["tokens"] == consumer["tokens"]
    if equal:  # the same sequence through both stacks: how far apart are their logits?
        ref, got = (torch.load(args.work / f"{d}-logits.pt") for d in ("dense", "ct24"))
        reference["max_abs_logit_diff"] = float((ref - got).abs().max())
    print(json.dumps({"equal": equal, "reference": reference, "ct24_consumer": consumer}, indent=2))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
