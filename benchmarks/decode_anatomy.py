"""Where a decode step's time goes: whole greedy steps against the step's matrices alone, per model.

    python benchmarks/decode_anatomy.py DIR@KIND [DIR@KIND ...] [--threads 1] [--rounds 5] [--tokens 64]

For each model (KIND: fp32, bf16, int8, int4) and round, interleaved: ``step`` is the median time of
``Engine.next_token`` over ``--tokens`` greedy steps; ``forward`` the same through ``forward([t]).argmax()``
(one logits tensor per step); ``matmuls`` one pass of ``nmr_matmul`` over every packed matrix in model
order (the weight bytes a step streams, without attention, norms and the rest; it includes one ctypes call
per matrix, about 1.5 us each); ``head`` the LM head alone. Prints the medians over rounds in ms. Run it on a
quiet machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time

import torch

from nmkit import models
from nmkit.runtime.engine import Engine


def _steps(engine: Engine, tokens: int, by_forward: bool) -> float:
    engine.reset()
    token = engine.next_token(1)
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(engine.forward([token]).argmax()) if by_forward else engine.next_token(token)
    return (time.perf_counter() - start) / tokens


def _matmuls(engine: Engine, tokens: int, only_head: bool) -> float:
    structs = list(engine._structs)[-1:] if only_head else list(engine._structs)
    x, y = torch.randn(8192), torch.empty(max(engine.vocab, 8192))
    start = time.perf_counter()
    for _ in range(tokens):
        for st in structs:
            engine.lib.nmr_matmul(ctypes.byref(st), x.data_ptr(), 1, y.data_ptr(), engine.isa, engine.threads)
    return (time.perf_counter() - start) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", metavar="DIR@KIND")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = {}
    for spec in args.models:
        path, _, kind = spec.partition("@")
        model = models.load(path)
        engines[spec] = Engine(model, weights=kind or "fp32", threads=args.threads, max_seq=args.tokens + 8)
        del model
    gc.collect()
    probes = {"step": lambda e: _steps(e, args.tokens, False), "forward": lambda e: _steps(e, args.tokens, True),
              "matmuls": lambda e: _matmuls(e, args.tokens, False), "head": lambda e: _matmuls(e, args.tokens, True)}
    times = {(spec, name): [] for spec in engines for name in probes}
    for _ in range(args.rounds):
        for spec, engine in engines.items():
            for name, probe in probes.items():
                times[(spec, name)].append(probe(engine))
    for spec in engines:
        med = {name: statistics.median(times[(spec, name)]) * 1e3 for name in probes}
        print(f"{spec}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in med.items())
              + f"; step - matmuls {med['step'] - med['matmuls']:.3f} ms; {1e3 / med['step']:.1f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
