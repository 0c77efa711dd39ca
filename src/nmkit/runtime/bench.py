"""``python -m nmkit.runtime.bench MODEL[@KIND[@HEAD]]``: decode and prefill speed of the lean runtime.

Prints one JSON object (``decode_tps``, ``prefill_tps``, ``weight_bytes_per_token``, ``label``, the
samples), the nmkit side of ``benchmarks/llamacpp_compare.py``. Decode: after one token, ``--decode``
greedy steps, timed as a whole, as ``llama-bench -n`` times token generation. Prefill: ``--prefill``
tokens in one call on an empty cache (``llama-bench -p``). Medians of ``--reps`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from nmkit import models, sidecar
from nmkit.errors import UserError
from nmkit.quant.storage import read_packed
from nmkit.runtime.engine import WEIGHT_KINDS, Engine


def parse_target(spec: str) -> tuple[str, str | None, str | None]:
    """``DIR@KIND@HEAD`` -> (DIR, KIND or None, HEAD or None)."""
    parts = spec.split("@")
    if len(parts) > 3 or any(p and p not in WEIGHT_KINDS for p in parts[1:]):
        raise UserError(f"{spec!r}: expected MODEL, MODEL@KIND or MODEL@KIND@HEAD, KIND one of "
                        f"{', '.join(WEIGHT_KINDS)}")
    return parts[0], (parts[1] or None) if len(parts) > 1 else None, (parts[2] or None) if len(parts) > 2 else None


def measure(engine: Engine, decode: int, prefill: int, reps: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, engine.vocab, (prefill,), generator=gen).tolist()
    decode_tps, prefill_tps = [], []
    for _ in range(reps):
        engine.reset()
        t0 = time.perf_counter()
        engine.forward(prompt)
        prefill_tps.append(prefill / (time.perf_counter() - t0))
        engine.reset()
        token = engine.next_token(prompt[0])
        t0 = time.perf_counter()
        for _ in range(decode):
            token = engine.next_token(token)
        decode_tps.append(decode / (time.perf_counter() - t0))
    return {"decode_tps": statistics.median(decode_tps), "prefill_tps": statistics.median(prefill_tps),
            "decode_samples": decode_tps, "prefill_samples": prefill_tps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nmkit.runtime.bench", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model alias or directory, optionally @KIND[@HEAD] (e.g. out/m@int4@int8)")
    ap.add_argument("--weights", choices=WEIGHT_KINDS, help="weight kind (default fp32, or the @KIND)")
    ap.add_argument("--head", choices=WEIGHT_KINDS, help="LM head kind (default: see nmkit.runtime.Engine)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode", type=int, default=64, help="greedy tokens timed (default 64)")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens timed (default 512)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    args = ap.parse_args(argv)
    try:
        path, kind, head = parse_target(args.model)
        # a `nmkit quantize` directory: its stored codes, unless another kind is asked for
        packed = read_packed(path)[0] if sidecar.stores_quantized(path) else {}
        stored = next(iter(packed.values())).kind if packed else None
        kind, head = args.weights or kind or stored or "fp32", args.head or head
        packed = packed if kind == stored else None
        if min(args.threads, args.decode, args.prefill, args.reps) < 1:
            raise UserError("--threads, --decode, --prefill and --reps must be positive")
        model = models.load(path)
        engine = Engine(model, weights=kind, head=head, threads=args.threads,
                        max_seq=max(args.prefill, args.decode + 1), packed=packed)
        del model
        result = measure(engine, args.decode, args.prefill, args.reps)
    except UserError as e:
        print(f"nmkit.runtime.bench: {e}", file=sys.stderr)
        return 2
    patterns = sorted({p for n, p in engine.info.patterns.items() if n != "lm_head"})
    result.update(label=f"nmkit {'/'.join(patterns)} {kind} (head {engine.info.head})",
                  weight_bytes_per_token=engine.info.weight_bytes, threads=args.threads, isa=engine.info.isa)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
