"""Block-skipping attention against torch's SDPA with the equivalent explicit boolean mask, on CPU.

    python benchmarks/block_attention_speed.py [--lengths 2048 8192] [--masks window select] [--rounds 3]
    python benchmarks/block_attention_speed.py --lengths 8192 --masks dfss

SmolLM2-like heads (9 query heads, 3 key/value heads, head dim 64), batch 1, fp32. Masks:
``window`` is causal with a sliding window (``--window`` keys); ``select`` is causal block-sparse,
keeping ``--select`` (N:M) key blocks per query block by the block-mean score estimate, shared by
all heads so that SDPA's explicit mask stays one L x L bool tensor (the selection is timed as part
of the block path). ``dfss`` is nmkit's DFSS N:M attention (``nm_attention``, causal, dense scores)
against SDPA with ``is_causal`` and with the explicit causal mask. Rounds alternate A and B; prints
median seconds and the ratio SDPA / block path (above 1: the block path is faster), and the largest
output difference. The explicit mask is built once, outside the timing, as a caller would hold it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nmkit.dynamic import nm_attention
from nmkit.dynamic.block_mask import causal_mask, select_blocks
from nmkit.dynamic.block_sparse import block_attention


def _seconds(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _compare(name: str, length: int, contenders: dict[str, Callable[[], torch.Tensor]], rounds: int) -> None:
    """Alternate the contenders for ``rounds`` rounds; the first is the one the others are divided by."""
    times: dict[str, list[float]] = {key: [] for key in contenders}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(rounds):
        for key, fn in contenders.items():
            seconds, outputs[key] = _seconds(fn)
            times[key].append(seconds)
    med = {key: statistics.median(values) for key, values in times.items()}
    first = next(iter(contenders))
    parts = [f"{key} {med[key]:.3f} s" for key in contenders]
    ratios = [f"{key} / {first} {med[key] / med[first]:.2f}x" for key in list(contenders)[1:]]
    diff = max((outputs[key] - outputs[first]).abs().max().item() for key in list(contenders)[1:])
    print(f"{name:>6} L={length:>5}: " + ", ".join(parts) + "; " + ", ".join(ratios)
          + f"; max |diff| {diff:.1e}", flush=True)


def _bench(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: argparse.Namespace) -> None:
    length = q.shape[-2]
    if kind == "dfss":
        kr, vr = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)  # as NMAttention does for GQA
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        _compare("dfss", length, {
            "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True),
            "dfss_2:4": lambda: nm_attention(q, kr, vr, "2:4", is_causal=True),
        }, args.rounds)
        return
    if kind == "window":
        mask = causal_mask(length, args.block, window=args.window)

        def block() -> torch.Tensor:
            return block_attention(q, k, v, mask)
    else:
        mask = select_blocks(q, k, args.select, args.block, shared_heads=True)

        def block() -> torch.Tensor:  # the selection is part of the cost
            return block_attention(q, k, v, select_blocks(q, k, args.select, args.block, shared_heads=True))
    dense = mask.to_dense()
    print(f"{kind:>6} L={length:>5}: {mask.density():.3f} of the block pairs read", flush=True)
    _compare(kind, length, {
        "block": block,
        "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True),
    }, args.rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--masks", nargs="+", default=["window", "select"], choices=["window", "select", "dfss"])
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--select", default="2:8", help="N:M key blocks kept per query block (default 2:8)")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for length in args.lengths:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, 9, length, 64, generator=gen)
        k = torch.randn(1, 3, length, 64, generator=gen)
        v = torch.randn(1, 3, length, 64, generator=gen)
        for kind in args.masks:
            _bench(kind, q, k, v, args)


if __name__ == "__main__":
    main()
