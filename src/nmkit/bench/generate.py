"""`nmkit bench generate MODEL_OR_DIR`: greedy decode and prefill, masked dense vs compressed.

The dense model is the pruned model with zeros in place (pruned here by magnitude if it is not N:M
yet); the compressed one is a copy after ``nmkit.nn.compress``. Both run interleaved in the same
process; the command checks that both generate the same tokens. ``MODEL_OR_DIR`` is anything
``nmkit.models.load`` accepts, or ``tiny`` for a small random Llama (a quick self-test).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import time

import torch
from torch import nn

from nmkit import models
from nmkit.nn import compress
from nmkit.patterns import NM
from nmkit.solvers.nm import nm_mask


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model alias, HF directory or id (see nmkit.models), or 'tiny'")
    parser.add_argument("--pattern", default="2:4", help="N:M pattern (keep N of every M); default 2:4")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens for the decode test")
    parser.add_argument("--prefill", type=int, default=512, help="tokens in the prefill test")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default: torch's)")
    parser.add_argument("--no-measure", action="store_true",
                        help="compress every pruned layer without the per-layer speed check")
    parser.add_argument("--fallback", default="keep", choices=("decompress", "keep"),
                        help="compress(..., fallback=): how layers run batches where dense measured faster")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="cpu: this thread's CPU time, leaving out time preempted by other jobs "
                             "(only meaningful with --threads 1)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--seed", type=int, default=0)


def _tiny_model(dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _load(name: str, dtype: torch.dtype) -> nn.Module:
    if name == "tiny":
        return _tiny_model(dtype)

    return models.load(name, dtype=dtype)


def prune_if_needed(model: nn.Module, pattern: NM) -> int:
    """Magnitude-prune every Linear (not lm_head) that does not follow ``pattern`` yet; returns how many."""
    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod) is nn.Linear and "lm_head" not in name and not pattern.is_valid(mod.weight != 0):
                mod.weight.mul_(nm_mask(mod.weight.abs(), pattern))
                n += 1
    return n


def _timed(fn, clock=time.perf_counter) -> tuple[float, object]:
    t0 = clock()
    out = fn()
    return clock() - t0, out


def run(args: argparse.Namespace) -> int:
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    pattern = NM.parse(args.pattern)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dense = _load(args.model, dtype)
    pruned = prune_if_needed(dense, pattern)
    sparse = copy.deepcopy(dense)
    report = compress(sparse, pattern, measure=not args.no_measure, fallback=args.fallback)
    print(f"# nmkit bench generate {args.model} {pattern} {args.dtype}  {started}  clock={args.clock}  "
          f"torch={torch.__version__} "
          f"load1={os.getloadavg()[0]:.2f}")
    print(f"# pruned here: {pruned} layers; compress: {len(report.changed)} of {len(report.layers)} Linear "
          f"layers sparse")
    vocab = dense.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=gen)
    long = torch.randint(0, vocab, (1, args.prefill), generator=gen)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    old = torch.get_num_threads()
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    rows = []
    try:
        for nt in threads:
            torch.set_num_threads(nt)
            kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            times = {"dense": {"decode": [], "prefill": []}, "sparse": {"decode": [], "prefill": []}}
            tokens = {}
            with torch.inference_mode():
                for m in (dense, sparse):  # warm-up
                    m.generate(prompt, max_new_tokens=2, do_sample=False)
                    m(long[:, :32], use_cache=False)
                for r in range(args.rounds):
                    order = [("dense", dense), ("sparse", sparse)]
                    for label, m in order if r % 2 == 0 else order[::-1]:
                        t, out = _timed(lambda m=m, kw=kw: m.generate(prompt, **kw), clock)
                        times[label]["decode"].append(t)
                        tokens[label] = out
                        t, _ = _timed(lambda m=m: m(long, use_cache=False), clock)
                        times[label]["prefill"].append(t)
            same = torch.equal(tokens["dense"], tokens["sparse"])
            d_dec, s_dec = (statistics.median(times[k]["decode"]) for k in ("dense", "sparse"))
            d_pre, s_pre = (statistics.median(times[k]["prefill"]) for k in ("dense", "sparse"))
            row = {
                "model": args.model, "pattern": str(pattern), "dtype": args.dtype, "threads": nt, "clock": args.clock,
                "decode_tok_s_dense": args.new_tokens / d_dec, "decode_tok_s_sparse": args.new_tokens / s_dec,
                "decode_ratio": d_dec / s_dec, "prefill_tokens": args.prefill,
                "prefill_ms_dense": d_pre * 1e3, "prefill_ms_sparse": s_pre * 1e3, "prefill_ratio": d_pre / s_pre,
                "same_tokens": same, "sparse_layers": len(report.changed), "linear_layers": len(report.layers),
            }
            rows.append(row)
            print(f"threads={nt}: decode {row['decode_tok_s_dense']:.1f} -> {row['decode_tok_s_sparse']:.1f} tok/s "
                  f"({row['decode_ratio']:.2f}x, {args.new_tokens} tokens after a {args.prompt_len}-token prompt); "
                  f"prefill {args.prefill} tokens {row['prefill_ms_dense']:.0f} -> {row['prefill_ms_sparse']:.0f} ms "
                  f"({row['prefill_ratio']:.2f}x); same tokens: {same}", flush=True)
    finally:
        torch.set_num_threads(old)
    print(f"# load1 at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"started": started, "results": rows, "compress": str(report)}, f, indent=1)
    return 0 if all(r["same_tokens"] for r in rows) else 1
