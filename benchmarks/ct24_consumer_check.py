"""Does the compressed-tensors-24 export load right in the only stack that decodes it?

compressed-tensors removed its sparse-24-bitmask decompressor after 0.14.0.1, and transformers 5
needs compressed-tensors >= 0.15, so the consumer stack is compressed-tensors 0.14.0.1 + transformers
4.57. This script builds that stack in its own virtual environment (``--work/venv``; needs the
network or a local wheel cache), loads the export there with plain ``AutoModelForCausalLM`` /
``AutoTokenizer`` (no nmkit), greedy-decodes a prompt, and compares the tokens with the dense export
decoded by this environment's transformers.

    .venv/bin/python benchmarks/ct24_consumer_check.py PRUNED_DIR --work /tmp/ct24-check

Exit status 0 when the tokens are equal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STACK = ["compressed-tensors==0.14.0.1", "transformers>=4.57,<4.58", "torch", "safetensors", "accelerate"]
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
versions = {"transformers": transformers.__version__, "torch": torch.__version__}
try:
    import compressed_tensors
    versions["compressed_tensors"] = compressed_tensors.__version__
except ImportError:
    pass
print(json.dumps({"tokens": out[0].tolist(), "dtype": str(model.dtype), "versions": versions}))
"""


def _decode(python: str, directory: Path, tokens: int) -> dict:
    out = subprocess.run([python, "-c", DECODE, str(directory), PROMPT, str(tokens)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pruned", type=Path, help="a 2:4 directory written by `nmkit prune`")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ct24-check"))
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    from nmkit.formats.io import export

    args.work.mkdir(parents=True, exist_ok=True)
    export(args.pruned, "dense", args.work / "dense")
    export(args.pruned, "compressed-tensors-24", args.work / "ct24")
    venv = args.work / "venv"
    python = str(venv / "bin" / "python")
    if not Path(python).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "--index-url", "https://download.pytorch.org/whl/cpu",
                        "torch"], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *STACK], check=True)
    reference = _decode(sys.executable, args.work / "dense", args.tokens)
    consumer = _decode(python, args.work / "ct24", args.tokens)
    equal = reference["tokens"] == consumer["tokens"]
    print(json.dumps({"equal": equal, "reference": reference, "ct24_consumer": consumer}, indent=2))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
