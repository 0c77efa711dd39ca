"""Block-skipping attention against torch's SDPA with the equivalent explicit boolean mask, on CPU.

    python benchmarks/block_attention_speed.py [--lengths 2048 8192] [--masks window select] [--rounds 3]
    python benchmarks/block_attention_speed.py --lengths 8192 --masks dfss [--reference]

SmolLM2-like heads (9 query heads, 3 key/value heads, head dim 64), batch 1, fp32. Masks:
``window`` is causal with a sliding window (``--window`` keys); ``select`` is causal block-sparse,
keeping ``--select`` (N:M) key blocks per query block by the block-mean score estimate, shared by
all heads so that SDPA's explicit mask stays one L x L bool tensor (the selection is timed as part
of the block path). ``dfss`` is nmkit's DFSS N:M attention (``nm_attention``, causal, grouped-query
heads read without a repeated copy: the fused CPU kernel) against SDPA with ``is_causal`` and with
the explicit causal mask (up to ``--mask-limit`` tokens); ``--reference`` also times the torch path
(``nm_attention_reference`` on repeated key/value heads, as the attention interface ran it before
the fused kernel). Rounds alternate the contenders; prints median seconds, the ratios of the
others' times to the first's (SDPA / block path, SDPA / DFSS path: above 1 the first is faster),
and the largest output difference (for ``dfss``: the fused path against the torch path when timed,
else against a torch-path recomputation of the first 256 queries). The explicit mask is built
once, outside the timing, as a caller would hold it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nmkit.dynamic import nm_attention
from nmkit.dynamic.attention import nm_attention_reference
from nmkit.dynamic.block_mask import causal_mask, select_blocks
from nmkit.dynamic.block_sparse import block_attention


def _seconds(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _compare(name: str, length: int, contenders: dict[str, Callable[[], torch.Tensor]], rounds: int,
             diff: Callable[[dict[str, torch.Tensor]], float] | None = None) -> None:
    """Alternate the contenders for ``rounds`` rounds; the first is the one the others are divided by.

    ``diff`` turns the outputs into the difference to print (default: the largest against the first)."""
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
    if diff is None:
        largest = max((outputs[key] - outputs[first]).abs().max().item() for key in list(contenders)[1:])
    else:
        largest = diff(outputs)
    print(f"{name:>6} L={length:>5}: " + ", ".join(parts) + "; " + ", ".join(ratios)
          + f"; max |diff| {largest:.1e}", flush=True)


def _bench(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: argparse.Namespace) -> None:
    length = q.shape[-2]
    if kind == "dfss":
        groups = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # the torch path's GQA
        contenders = {
            "dfss_2:4": lambda: nm_attention(q, k, v, "2:4", is_causal=True, enable_gqa=True),
            "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        }
        if length <= args.mask_limit:
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            contenders["sdpa_mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal,
                                                                             enable_gqa=True)
        if args.reference:
            contenders["dfss_torch"] = lambda: nm_attention_reference(q, kr, vr, "2:4", is_causal=True)

        def fused_vs_torch(outputs: dict[str, torch.Tensor]) -> float:
            if "dfss_torch" in outputs:
                return (outputs["dfss_2:4"] - outputs["dfss_torch"]).abs().max().item()
            head = nm_attention_reference(q[..., :256, :], kr, vr, "2:4", is_causal=True)  # causal: rows see only
            return (outputs["dfss_2:4"][..., :256, :] - head).abs().max().item()  # keys before them

        _compare("dfss", length, contenders, args.rounds, fused_vs_torch)
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
    ap.add_argument("--reference", action="store_true", help="dfss: also time nm_attention's torch path (slow)")
    ap.add_argument("--mask-limit", type=int, default=16384,
                    help="dfss: time SDPA with the explicit L x L causal mask only up to this length")
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
