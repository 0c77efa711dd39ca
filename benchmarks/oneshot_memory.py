"""Peak memory of calibrated one-shot pruning vs model depth.

The sequential pipeline holds one block's activations, so peak RSS minus the model's own weights
should stay flat as blocks are added. Each depth runs in a fresh process (ru_maxrss is per process).

    python benchmarks/oneshot_memory.py [--depths 4,8,16] [--method sparsegpt]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def one_run(depth: int, method: str, samples: int, seqlen: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nmkit.oneshot import prune

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=depth,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=seqlen)
    model = LlamaForCausalLM(config).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    calib = torch.randint(0, 1024, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    prune(model, "2:4", method, calibration=calib, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    activations = samples * seqlen * config.hidden_size * 4
    return {"depth": depth, "weights_mb": weights / 2**20, "rss_before_mb": before / 2**20,
            "peak_mb": peak / 2**20, "growth_during_prune_mb": (peak - before) / 2**20,
            "one_stream_mb": activations / 2**20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="4,8,16")
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(one_run(args.child, args.method, args.samples, args.seqlen)))
        return 0
    print("| depth | weights MB | peak RSS MB | growth during prune MB | one activation stream MB |")
    print("|---|---|---|---|---|")
    for depth in map(int, args.depths.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", str(depth), "--method", args.method,
                              "--samples", str(args.samples), "--seqlen", str(args.seqlen)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {r['depth']} | {r['weights_mb']:.0f} | {r['peak_mb']:.0f} | {r['growth_during_prune_mb']:.0f} | "
              f"{r['one_stream_mb']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
