"""Whole-model prefill with DFSS N:M attention against torch SDPA: SmolLM2-135M (Hugging Face forward, fp32,
no autograd), one sequence of T tokens, the LM head on the last position only.

    python benchmarks/dfss_model_speed.py --lengths 2048 8192 --rounds 3 [--pattern 2:4] [--threads 2]

Each round times SDPA (``is_causal``, what transformers runs by default) and then the same forward with
``NMAttention(model, pattern)`` (the fused C kernel: scores pruned in registers, only kept keys' values
read). Prints per length the medians, the ratio SDPA / DFSS (median of per-round ratios) and the share of
the SDPA forward spent in attention (the forward with attention replaced by a no-op, subtracted). Run it on
a quiet machine. The quality cost of DFSS is in BENCHMARKS.md (run-time N:M attention).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _forward_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the raw times here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from nmkit import models
    from nmkit.dynamic.attention import NMAttention

    model = models.load(args.model).eval()
    model.set_attn_implementation("sdpa")

    def no_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return query.transpose(1, 2).contiguous(), None  # same shape as attention's output, no work

    AttentionInterface.register("nmkit_bench_none", no_attention)
    AttentionMaskInterface.register("nmkit_bench_none", sdpa_mask)
    raw = {}
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        _forward_seconds(model, ids[:, :256])  # warm-up
        t = {"sdpa": [], "dfss": [], "none": []}
        for _ in range(args.rounds):
            t["sdpa"].append(_forward_seconds(model, ids))
            with NMAttention(model, args.pattern):
                t["dfss"].append(_forward_seconds(model, ids))
            model.set_attn_implementation("nmkit_bench_none")
            t["none"].append(_forward_seconds(model, ids))
            model.set_attn_implementation("sdpa")
        ratio = statistics.median(s / d for s, d in zip(t["sdpa"], t["dfss"], strict=True))
        sdpa, dfss, rest = (statistics.median(t[k]) for k in ("sdpa", "dfss", "none"))
        print(f"{length} tokens: SDPA {sdpa:.3f} s, DFSS {args.pattern} {dfss:.3f} s, ratio {ratio:.2f}x; "
              f"attention {100 * (sdpa - rest) / sdpa:.0f}% of the SDPA forward (rest {rest:.3f} s)")
        raw[length] = t
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds": raw}, f, indent=1)


if __name__ == "__main__":
    main()
