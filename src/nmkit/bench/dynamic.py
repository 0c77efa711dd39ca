"""`nmkit bench dynamic [MODEL]`: what run-time N:M sparsity costs in quality, config by config.

Each ``--config`` is a comma-separated list of ``attention=N:M`` (DFSS score pruning; ``@LAYERS``
limits it, e.g. ``attention=2:4@2-29``) and ``activations=N:M`` (FFN inputs). The model is loaded
and tokenised once, the baseline (no run-time sparsity) is evaluated once, then every config under
the same protocol: perplexity for a causal LM, embedding cosine to the baseline for an encoder.
Evaluation seconds are reported as a ratio to the baseline's: the reference implementations compute
dense scores, so they show the overhead of the masking, not a speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from dataclasses import dataclass

import torch

from nmkit import data, models
from nmkit.data import tokenize
from nmkit.dynamic import runtime_sparsity
from nmkit.errors import UserError
from nmkit.evaluate import embedding_fidelity, perplexity_of_windows, protocol_for
from nmkit.evaluate import eval_windows as cut_windows
from nmkit.patterns import NM
from nmkit.selection import parse_layers

DEFAULT_CONFIGS = [
    "attention=1:2", "attention=2:4", "attention=4:8", "attention=1:4", "attention=2:8",
    "activations=2:4", "activations=4:8", "activations=8:16", "activations=2:8",
    "attention=2:4,activations=8:16",
]


@dataclass(frozen=True)
class DynamicConfig:
    label: str
    attention: NM | None = None
    layers: tuple[int, ...] | None = None
    activations: NM | None = None


def parse_config(spec: str) -> DynamicConfig:
    attention = activations = layers = None
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        if key == "attention":
            pattern, _, layer_spec = value.partition("@")
            attention = NM.parse(pattern)
            layers = None if not layer_spec else tuple(parse_layers(layer_spec.replace(";", ",")))
        elif key == "activations":
            activations = NM.parse(value)
        else:
            raise UserError(f"--config {spec!r}: use attention=N:M[@LAYERS] and/or activations=N:M, "
                            "comma-separated (e.g. attention=2:4,activations=8:16)")
    if attention is None and activations is None:
        raise UserError(f"--config {spec!r} sets no run-time sparsity")
    return DynamicConfig(spec, attention, layers, activations)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="smollm2-135m",
                        help="built-in alias (smollm2-135m, minilm), local HF directory or HF id")
    parser.add_argument("--config", action="append", default=None, metavar="SPEC",
                        help="attention=N:M[@LAYERS] and/or activations=N:M, comma-separated; repeat for more "
                             f"(default: {' | '.join(DEFAULT_CONFIGS)}); LAYERS like 2-29, ';' between ranges")
    parser.add_argument("--eval-seqlen", type=int, default=2048, metavar="S")
    parser.add_argument("--eval-windows", type=int, default=16, metavar="K")
    parser.add_argument("--data-dir", default=None, metavar="D", help="as for `nmkit eval` (default $NMKIT_DATA)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    configs = [parse_config(c) for c in (args.config or DEFAULT_CONFIGS)]
    source = models.resolve(args.model)
    if data.data_dir(args.data_dir) is not None:
        data.check_data_dir(data.data_dir(args.data_dir))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model, tokenizer = models.load(source), models.load_tokenizer(source)
    text = data.load_text("test", args.data_dir)
    causal = source.kind == "causal-lm"
    if causal:
        ids = tokenize(tokenizer, text)
        windows = cut_windows(ids, args.eval_seqlen, args.eval_windows)
        protocol = protocol_for(text, ids, args.eval_seqlen, args.eval_windows)

        def score(reference=None):
            return {"ppl": math.exp(perplexity_of_windows(model, windows, progress=False))}
    else:
        def score(reference=None):
            fid = embedding_fidelity(model, tokenizer, text, reference=reference)
            return {"fidelity": fid, "cosine_mean": fid.cosine_mean, "cosine_min": fid.cosine_min}

    print(f"# nmkit bench dynamic {source.name}  {started}  torch={torch.__version__}  "
          f"threads={torch.get_num_threads()}  load1={os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    base = score()
    base_s = time.perf_counter() - t0
    if causal:
        print(f"# baseline perplexity {base['ppl']:.4f} ({protocol['windows']} windows x {protocol['seqlen']} "
              f"tokens of {protocol['dataset']}, {base_s:.1f} s)", flush=True)
        print("| run-time N:M | perplexity | x baseline | eval time x baseline |\n|---|---|---|---|")
    else:
        protocol = base["fidelity"].protocol
        print(f"# encoder: cosine to its own embeddings without run-time sparsity, "
              f"{protocol['sentences']} sentences", flush=True)
        print("| run-time N:M | cosine mean | cosine min | eval time x baseline |\n|---|---|---|---|")
    rows = []
    for config in configs:
        t0 = time.perf_counter()
        with torch.inference_mode(), runtime_sparsity(model, config.attention, config.layers, config.activations):
            result = score(None if causal else base["fidelity"])
        seconds = time.perf_counter() - t0
        row = {"config": config.label, "eval_s": seconds, "eval_time_ratio": seconds / base_s}
        if causal:
            row |= {"ppl": result["ppl"], "ppl_ratio": result["ppl"] / base["ppl"]}
            print(f"| {config.label} | {row['ppl']:.4f} | {row['ppl_ratio']:.4f} | {row['eval_time_ratio']:.2f} |",
                  flush=True)
        else:
            row |= {"cosine_mean": result["cosine_mean"], "cosine_min": result["cosine_min"]}
            print(f"| {config.label} | {row['cosine_mean']:.5f} | {row['cosine_min']:.5f} | "
                  f"{row['eval_time_ratio']:.2f} |", flush=True)
        rows.append(row)
    print(f"# load1 at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        out = {"started": started, "model": source.name, "eval": protocol, "baseline_s": base_s,
               "baseline_ppl": base.get("ppl"), "results": rows}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)
    return 0
