"""Perplexity of quantized N:M models through the runtime (the docs/quant.md table), pinned protocol.

    PYTHONPATH=src .venv/bin/python benchmarks/quant_perplexity.py MODEL [--quant w4 [options]] \
        [--model-epochs E [--model-lr LR]] [--evals int4:int8,fp32:fp32] [--before fp32:int8]

MODEL: a model alias (every block Linear is quantized, dense), a directory written by `nmkit prune`
(its pruned layers are quantized, mask fixed) or by `nmkit quantize` (its stored codes are used).
With ``--quant``, the calibrated sweep of `nmkit quantize` runs in this process (64 x 512 tokens of
WikiText-2 train, seed 0), so no directory is written. Each ``--evals`` entry ``KIND:HEAD`` is one
runtime perplexity (WikiText-2 test, ``--windows`` x 2048 tokens): the integer kinds run the
calibrated codes with INT8 activations (a fitted-grid layer as INT8 codes, the same arithmetic);
``fp32`` runs the dequantized weights with fp32 activations, which isolates the weights' share of the
loss. ``--before`` evaluates before quantizing (e.g. ``fp32:int8``: the INT8 LM head alone).
``--model-epochs E``: after the sweep is evaluated, the whole-model fit of ``nmkit quantize --quant-epochs``
runs and the same evaluations follow (stage ``fitted``).
Prints one JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nmkit import data, models, sidecar
from nmkit.oneshot.targets import find_targets
from nmkit.patterns import NM
from nmkit.quant import QuantSpec
from nmkit.quant.gptq import quantize_model
from nmkit.quant.model_fit import fit_quantized, teacher_states
from nmkit.quant.storage import packed_layer, read_packed
from nmkit.runtime.engine import Engine
from nmkit.runtime.evaluate import perplexity


def layer_patterns(model_arg: str, model) -> dict[str, NM | None]:
    if Path(model_arg).is_dir():
        return {n: NM.parse(entry["pattern"]) for n, entry in sidecar.read(model_arg)["layers"].items()}
    return {t.name: None for t in find_targets(model) if t.name != "lm_head"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--quant", choices=("w8", "w4"), help="quantize in this process (GPTQ, mask fixed)")
    ap.add_argument("--group-blocks", type=int, default=1, help="64-input blocks per scale (default 1)")
    ap.add_argument("--grid", choices=("uniform", "fitted"), default="uniform")
    ap.add_argument("--refine", type=int, default=0)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--model-epochs", type=int, default=0, help="whole-model fit after GPTQ (--quant-epochs)")
    ap.add_argument("--model-lr", type=float, default=1e-4)
    ap.add_argument("--evals", default="int4:int8", help="KIND:HEAD,... after quantizing")
    ap.add_argument("--before", default="", help="KIND:HEAD,... before quantizing")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    packed = read_packed(args.model)[0] if sidecar.stores_quantized(args.model) else {}
    model, tokenizer = models.load(args.model), models.load_tokenizer(args.model)
    text = data.load_text("test")
    ids = data.tokenize(tokenizer, text)
    record = {"model": args.model, "quant": args.quant, "group_blocks": args.group_blocks, "grid": args.grid,
              "refine": args.refine, "act_order": args.act_order, "damp": args.damp,
              "model_epochs": args.model_epochs, "model_lr": args.model_lr}

    def evaluate(evals: str, stage: str) -> None:
        stored = next(iter(packed.values())).kind if packed else None
        for entry in filter(None, evals.split(",")):
            kind, head = entry.split(":")
            engine = Engine(model, weights=kind, head=head, threads=args.threads, max_seq=2048,
                            packed=packed if kind == stored else None)
            start = time.perf_counter()
            ppl = perplexity(engine, tokenizer, text, 2048, args.windows, ids=ids, progress=False).ppl
            print(json.dumps({**record, "stage": stage, "weights": kind, "head": engine.info.head,
                              "stored_codes": kind == stored, "ppl": round(ppl, 4),
                              "eval_s": round(time.perf_counter() - start)}), flush=True)

    evaluate(args.before, "before")
    if args.quant:
        spec = QuantSpec.parse(args.quant, args.group_blocks)
        train = data.load_text("train")
        calibration = data.calibration_windows(data.tokenize(tokenizer, train), 64, 512, 0)
        teacher = teacher_states(model, calibration) if args.model_epochs else None  # before rounding
        result = quantize_model(model, calibration, spec, layer_patterns(args.model, model), damp=args.damp,
                                progress=False, act_order=args.act_order, refine=args.refine,
                                fit_grid=args.grid == "fitted")
        packed = {n: packed_layer(layer, model.get_submodule(n).bias) for n, layer in result.layers.items()}
        mean_error = sum(result.rel_errors.values()) / len(result.rel_errors)
        print(json.dumps({**record, "stage": "quantize", "seconds": round(result.seconds),
                          "mean_rel_error": round(mean_error, 6)}), flush=True)
        if args.model_epochs:  # the sweep's perplexity first, then the whole-model fit's (--quant-epochs)
            evaluate(args.evals, "after")
            start = time.perf_counter()
            fit = fit_quantized(model, result.layers, calibration, teacher, epochs=args.model_epochs,
                                lr=args.model_lr, log=print)
            packed = {n: packed_layer(layer, model.get_submodule(n).bias) for n, layer in result.layers.items()}
            print(json.dumps({**record, "stage": "model_fit", "seconds": round(time.perf_counter() - start),
                              "before": fit.loss_before, "after": fit.loss_after, "steps": fit.steps}), flush=True)
    evaluate(args.evals, "fitted" if args.model_epochs else "after")


if __name__ == "__main__":
    main()
